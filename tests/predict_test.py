"""The predict CLI: top-k class names and probabilities for image files."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from evaluate_test import tiny_digits_config
from vgg_flax import evaluate
from vgg_flax import input_pipeline
from vgg_flax import predict
from vgg_flax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_predict_matches_evaluation_and_prints_top_k(tmp_path):
  # One test, so that pytest-xdist does not train the run once per worker.
  config = tiny_digits_config(tmp_path / 'data')
  config.eval_batch_size = 20
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(config, workdir)
  builder = input_pipeline.get_builder(config)
  paths = []
  for i, ex in enumerate(builder.as_dataset(split='test').take(20).as_numpy_iterator()):
    paths.append(str(tmp_path / f'digit{i}.png'))
    Image.fromarray(ex['image'][..., 0]).save(paths[-1])  # PNG: lossless.

  results = predict.predict(workdir, paths, top_k=3)
  assert len(results) == len(paths)
  for top in results:
    names, probs = zip(*top)
    assert len(top) == 3 and set(names) <= set('0123456789')
    assert list(probs) == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
  # The same classes as the evaluation pipeline gives for the same 20 test images.
  model, variables, _ = evaluate.restore_model(workdir, config)
  batch = next(input_pipeline.eval_batches(config, builder,
                                           input_pipeline.dataset_info(config, builder)))
  variables = {k: v for k, v in variables.items() if v}
  expected = np.argmax(jax.jit(model.apply)(variables, batch['image']), -1)
  assert [top[0][0] for top in results] == [str(c) for c in expected]

  out = subprocess.run([sys.executable, '-m', 'vgg_flax.predict', f'--workdir={workdir}',
                        '--top_k=2', *paths[:2]], capture_output=True, text=True, cwd=ROOT,
                       check=True)
  lines = out.stdout.strip().splitlines()
  assert lines[0] == paths[0] and lines[3] == paths[1] and len(lines) == 6
  assert lines[1].split()[-1] == results[0][0][0] and '%' in lines[1]
  (tmp_path / 'bad.png').write_text('not an image')
  with pytest.raises(ValueError, match='bad.png is not a readable'):
    predict.predict(workdir, [str(tmp_path / 'bad.png')])
