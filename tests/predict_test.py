"""The predict CLI: top-k class names and probabilities for image files; the preset of
imported weights, decided once for predict, convert and load."""

import json
import os
import subprocess

import h5py
import jax
import numpy as np
import pytest
from PIL import Image

from evaluate_test import tiny_digits_config
from vgg_flax.data import input_pipeline
from vgg_flax.interop import hub
from vgg_flax.interop import transfer
from vgg_flax import predict
from vgg_flax import train

from helpers import python

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_predict_matches_evaluation_and_prints_top_k(tmp_path, digits):
  # One test, so that pytest-xdist does not train the run once per worker.
  config = tiny_digits_config(digits)
  config.eval_batch_size = 20
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(config, workdir)
  builder = input_pipeline.get_builder(config)
  paths = []
  for i, ex in enumerate(builder.as_dataset(split='test').take(20).as_numpy_iterator()):
    paths.append(str(tmp_path / f'digit{i}.png'))
    Image.fromarray(ex['image'][..., 0]).save(paths[-1])  # PNG: lossless.

  results = predict.predict(workdir, paths, top_k=3)
  # The reference: the softmax of the model's logits on the evaluation pipeline's batch
  # of the same 20 test images, its top 3 by probability.
  model, variables, _ = transfer.restore_model(workdir, config)
  batch = next(input_pipeline.eval_batches(config, builder,
                                           input_pipeline.dataset_info(config, builder)))
  variables = {k: v for k, v in variables.items() if v}
  reference = np.asarray(jax.nn.softmax(
      np.asarray(jax.jit(model.apply)(variables, batch['image']), np.float64)))
  order = np.argsort(-reference, axis=-1)[:, :3]
  assert len(results) == len(paths) == len(reference)
  for top, probs, best in zip(results, reference, order):
    assert [name for name, _ in top] == [str(c) for c in best]
    np.testing.assert_allclose([p for _, p in top], probs[best], rtol=1e-5, atol=1e-7)

  out = subprocess.run([python(), '-m', 'vgg_flax.predict', f'--workdir={workdir}',
                        '--top_k=2', *paths[:2]], capture_output=True, text=True, cwd=ROOT,
                       check=True)
  lines = out.stdout.strip().splitlines()
  assert lines[0] == paths[0] and lines[3] == paths[1] and len(lines) == 6
  for i, printed in enumerate((lines[1:3], lines[4:6])):  # '  62.76%  7': 2 decimals.
    assert [line.split('%')[1].strip() for line in printed] == [str(c) for c in order[i, :2]]
    np.testing.assert_allclose([float(line.split('%')[0]) for line in printed],
                               100 * reference[i, order[i, :2]], atol=0.0051)
  (tmp_path / 'bad.png').write_text('not an image')
  with pytest.raises(ValueError, match='bad.png is not a readable'):
    predict.predict(workdir, [str(tmp_path / 'bad.png')])


def test_a_keras_applications_file_gets_caffe_in_predict_convert_and_load(tmp_path):
  # One decision (hub.source_preset) for every command: a Keras Applications VGG16 (the
  # downloads' legacy weights layout) is predicted, converted and loaded with 'caffe'.
  os.environ.setdefault('KERAS_BACKEND', 'jax')
  keras = pytest.importorskip('keras')
  from keras.src.legacy.saving import legacy_h5_format  # pylint: disable=g-import-not-at-top
  keras.utils.set_random_seed(0)
  vgg16 = keras.applications.VGG16(weights=None, input_shape=(32, 32, 3))
  rng = np.random.RandomState(1)
  for layer in vgg16.layers:  # He-scaled: logits that spread the 1000 probabilities.
    if layer.get_weights():
      kernel, bias = layer.get_weights()
      layer.set_weights([rng.randn(*kernel.shape).astype(np.float32) * np.sqrt(
          2 / np.prod(kernel.shape[:-1])), bias])
  path = tmp_path / 'vgg16_weights_tf_dim_ordering_tf_kernels.h5'
  with h5py.File(path, 'w') as f:
    legacy_h5_format.save_weights_to_hdf5_group(f, vgg16)

  # 36 px: the smaller side resized to 36 (256/224 of 32) keeps it; the crop is [2:34].
  pixels = rng.randint(0, 256, (36, 36, 3)).astype(np.uint8)
  Image.fromarray(pixels).save(tmp_path / 'photo.png')
  crop = keras.applications.vgg16.preprocess_input(pixels[2:34, 2:34].astype(np.float32))
  expected = keras.ops.convert_to_numpy(vgg16(crop[None]))[0]  # Keras' softmax, with caffe.
  order = np.argsort(-expected)[:3]
  out = subprocess.run([python(), '-m', 'vgg_flax.predict', f'--weights={path}',
                        '--top_k=3', str(tmp_path / 'photo.png')], capture_output=True,
                       text=True, cwd=ROOT)
  assert out.returncode == 0 and '--preset' not in out.stderr, out.stderr[-2000:]
  lines = out.stdout.strip().splitlines()[1:]
  assert [line.split('%', 1)[1].strip() for line in lines] == [
      predict.imagenet_classes()[i] for i in order]
  np.testing.assert_allclose([float(line.split('%')[0]) for line in lines],
                             100 * expected[order], atol=0.0051)

  out = subprocess.run([python(), '-m', 'vgg_flax.convert', '--from=keras',
                        f'--input={path}', f'--output={tmp_path}/folder'], capture_output=True,
                       text=True, cwd=ROOT, check=True)
  assert out.stdout.strip().splitlines()[-1] == (
      f'Train from it with --config.init_from={tmp_path}/folder --config.input.preset=caffe')
  assert json.loads((tmp_path / 'folder' / 'weights.json').read_text())['preset'] == 'caffe'
  assert hub.load_with_info(tmp_path / 'folder')[2]['preset'] == 'caffe'
  assert hub.load_with_info(path)[2]['preset'] == 'caffe'
