"""End to end: training lowers the loss, leaves its artefacts, resumes, stops early."""

import glob
import json
import os
import subprocess
import sys

import pytest

from vgg_flax import checkpoint
from vgg_flax import reporting
from vgg_flax import train

from helpers import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(ROOT, 'configs', 'default.py')


def test_training_lowers_the_loss_and_writes_artefacts(tmp_path):
  workdir = str(tmp_path / 'run')
  results = train.train_and_evaluate(tiny_config(tmp_path / 'data'), workdir)
  rows = reporting.read_metrics(os.path.join(workdir, 'metrics.jsonl'))
  losses = [r['train_loss'] for r in rows if 'train_loss' in r]
  assert len(losses) >= 4
  assert losses[-1] < 0.7 * losses[0]
  assert results['eval_accuracy'] > 0.4  # Chance is 0.1.
  assert 0 < results['eval_loss'] < 2.3
  assert results['eval_top5_accuracy'] >= results['eval_accuracy']
  evals = [r for r in rows if 'eval_accuracy' in r]
  assert [r['step'] for r in evals] == [20, 40]
  assert os.path.getsize(os.path.join(workdir, 'curves.png')) > 5000
  assert glob.glob(os.path.join(workdir, 'events.out.tfevents.*'))
  assert os.listdir(os.path.join(workdir, 'checkpoints', 'best'))
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['model']['depth'] == 11


def test_rerun_resumes_from_the_latest_checkpoint(tmp_path):
  workdir = str(tmp_path / 'run')
  data = tmp_path / 'data'
  train.train_and_evaluate(tiny_config(data, num_epochs=1), workdir)
  # The same command with more epochs continues at step 20, not at step 1.
  train.train_and_evaluate(tiny_config(data, num_epochs=2), workdir)
  rows = reporting.read_metrics(os.path.join(workdir, 'metrics.jsonl'))
  steps = [r['step'] for r in rows if 'train_loss' in r]
  assert steps == sorted(set(steps)) and steps[-1] == 40
  assert [r['step'] for r in rows if 'eval_accuracy' in r] == [20, 40]
  ckpt = checkpoint.Checkpointer(workdir, keep=2)
  assert ckpt.latest_step() == 40
  ckpt.close()
  # A finished run is not trained again.
  assert train.train_and_evaluate(tiny_config(data, num_epochs=2), workdir)['eval_accuracy'] > 0


def test_early_stopping(tmp_path):
  workdir = str(tmp_path / 'run')
  # SGD at lr 1e-20 without BatchNorm leaves the weights as they are, so the
  # eval loss never improves after the first: patience 2 stops at the third of six.
  config = tiny_config(tmp_path / 'data', num_epochs=6, early_stopping_patience=2,
                       optimizer='sgd', learning_rate=1e-20,
                       **{'model.batch_norm': False, 'checkpoint.monitor': 'eval_loss',
                          'checkpoint.mode': 'min'})
  train.train_and_evaluate(config, workdir)
  rows = reporting.read_metrics(os.path.join(workdir, 'metrics.jsonl'))
  assert [r['step'] for r in rows if 'eval_loss' in r] == [20, 40, 60]
  ckpt = checkpoint.Checkpointer(workdir, keep=2)
  assert ckpt.best.latest_step() == 20
  ckpt.close()


def test_a_workdir_of_another_model_is_refused(tmp_path):
  workdir = str(tmp_path / 'run')
  data = tmp_path / 'data'
  train.train_and_evaluate(tiny_config(data, num_epochs=1), workdir)
  with pytest.raises(ValueError, match=r'holds a run of a different model \(model.depth: 11 -> 13\)'):
    train.train_and_evaluate(tiny_config(data, **{'model.depth': 13}), workdir)


def _cli(*args, timeout=120):
  return subprocess.run([sys.executable, '-m', 'vgg_flax.train', *args], capture_output=True,
                        text=True, timeout=timeout, cwd=ROOT)


def test_cli_typo_fails_at_launch(tmp_path):
  result = _cli(f'--config={DEFAULT_CONFIG}', f'--workdir={tmp_path}', '--config.model.dept=19')
  assert result.returncode != 0
  assert 'dept' in result.stderr and 'depth' in result.stderr
  assert not os.path.exists(tmp_path / 'checkpoints')


def test_cli_bad_value_fails_before_training(tmp_path):
  result = _cli(f'--config={DEFAULT_CONFIG}', f'--workdir={tmp_path / "run"}',
                '--config.model.kernel_size=4')
  assert result.returncode != 0
  assert 'config.model.kernel_size=4 is not allowed: must be a positive odd integer' in result.stderr
  assert not os.path.exists(tmp_path / 'run')


def test_cli_trains_on_eight_devices(tmp_path):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8')
  result = subprocess.run(
      [sys.executable, '-m', 'vgg_flax.train', f'--config={DEFAULT_CONFIG}',
       f'--workdir={tmp_path / "run"}', f'--config.data_dir={tmp_path / "data"}',
       '--config.model.depth=11', '--config.model.width=8', '--config.model.fc_dim=32',
       '--config.num_epochs=1', '--config.batch_size=32', '--config.learning_rate=0.003',
       '--config.train_split=train[:640]'],
      capture_output=True, text=True, timeout=240, cwd=ROOT, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'on 8 devices' in result.stderr
  rows = reporting.read_metrics(str(tmp_path / 'run' / 'metrics.jsonl'))
  assert rows[-1]['eval_accuracy'] > 0.2


@pytest.mark.parametrize('field', ['batch_size', 'eval_batch_size'])
def test_batch_that_does_not_divide_over_devices(tmp_path, field):
  # Regression: eval_batch_size was only found out at the first evaluation.
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8')
  result = subprocess.run(
      [sys.executable, '-m', 'vgg_flax.train', f'--config={DEFAULT_CONFIG}',
       f'--workdir={tmp_path / "run"}', f'--config.data_dir={tmp_path / "data"}',
       f'--config.{field}=36'],
      capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
  assert result.returncode != 0
  assert f'config.{field}=36 does not divide over 8 devices; use a multiple of 8.' in result.stderr
  assert not os.path.exists(tmp_path / 'data')  # Refused before any data was read.


@pytest.mark.parametrize('overrides, message', [
    ({'model.head': 'none'}, r"config.model.head='none' outputs features, not class scores; "
     r"training needs 'fc' or 'gap'"),
    ({'model.dtype': 'float16'}, r"config.model.dtype='float16' is not allowed for training: "
     r"float16 gradients underflow without loss scaling; use 'bfloat16'"),
])
def test_configs_training_cannot_use_fail_at_launch(tmp_path, overrides, message):
  # Regression: head='none' trained on 64-d features as logits (accuracy 0).
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(tiny_config(tmp_path / 'data', **overrides), str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'data') and not os.path.exists(tmp_path / 'run')


def test_uint8_transfer_trains_and_evaluates(tmp_path):
  # Batches as uint8, normalised inside the jitted steps: the same run, a
  # quarter of the bytes to the devices.
  workdir = str(tmp_path / 'run')
  results = train.train_and_evaluate(
      tiny_config(tmp_path / 'data', num_epochs=1, **{'input.uint8_transfer': True}), workdir)
  reference = train.train_and_evaluate(tiny_config(tmp_path / 'data', num_epochs=1),
                                       str(tmp_path / 'float'))
  assert results['eval_accuracy'] > 0.2  # Chance is 0.1.
  # 0.9% apart when run alone; 6% once inside a loaded suite run (cause not found):
  # the bound is what 'trains the same' means after one epoch of 20 steps.
  assert abs(results['eval_loss'] - reference['eval_loss']) < 0.1 * reference['eval_loss']
