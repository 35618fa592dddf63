"""evaluate_workdir and the evaluate CLI on a tiny trained digits run."""

import subprocess

import pytest

from vgg_flax.config import get_base_config
from vgg_flax import evaluate
from vgg_flax import train

from helpers import python


def tiny_digits_config(data_dir):
  config = get_base_config()
  config.dataset, config.data_dir = 'digits', str(data_dir)
  config.model.update(dict(depth=11, width=8, fc_dim=16, dropout_rate=0.0, conv_impl='xla'))
  config.image_size = 32
  config.input.update(dict(scale_min=32, scale_max=32, eval_resize=32, flip=False,
                           normalization='mean_std', mean=(77.7,), std=(82.5,), cache=True,
                           shuffle_buffer=256))
  config.batch_size, config.num_epochs, config.log_every_steps = 32, 1, 20
  config.optimizer, config.learning_rate, config.schedule.name = 'adam', 3e-3, 'constant'
  return config


def test_evaluate_workdir_and_cli_reproduce_the_training_evaluation(tmp_path, digits):
  # One test, so that pytest-xdist does not train the run once per worker.
  path = str(tmp_path / 'run')
  trained = train.train_and_evaluate(tiny_digits_config(digits), path)
  results = evaluate.evaluate_workdir(path)
  assert results['step'] == 44 and results['num_examples'] == 360
  for key in ('eval_loss', 'eval_accuracy', 'eval_top5_accuracy'):
    assert results[key] == pytest.approx(trained[key], abs=1e-5), key
  # Another batch size pads the last batch differently; the metrics do not change.
  other = evaluate.evaluate_workdir(path, {'eval_batch_size': '50'})
  assert other['eval_accuracy'] == pytest.approx(trained['eval_accuracy'], abs=1e-6)
  on_train = evaluate.evaluate_workdir(path, split='train', checkpoint='latest')
  assert on_train['num_examples'] == 1437 and 0 < on_train['eval_accuracy'] <= 1

  with pytest.raises(KeyError, match='no field'):
    evaluate.evaluate_workdir(path, {'model.dept': '19'})
  with pytest.raises(FileNotFoundError, match='is .* a vgg_flax training workdir'):
    evaluate.evaluate_workdir(digits)  # A folder, not a workdir.

  # A relative --workdir (orbax needs absolute paths for its metadata).
  out = subprocess.run(
      [python(), '-m', 'vgg_flax.evaluate', '--workdir=run',
       '--config.eval_batch_size=120'], capture_output=True, text=True, cwd=tmp_path, check=True)
  line = out.stdout.strip().splitlines()[-1]
  assert 'step 44, 360 examples' in line
  assert f'top-1 {trained["eval_accuracy"]:.4f}' in line
