"""Shared test helpers."""

import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(ROOT, 'configs', 'default.py')
_WARM = {}  # 'python': the shim of this worker's warm server (conftest.py starts it).


def python() -> str:
  """The `python` for a test's `-m vgg_flax.*` or `-c` command: one forked from this
  worker's warm interpreter (tests/warm_python.py), which has imported the CLIs
  once. Signals sent to it reach the command; a test that needs the command's own
  PID (a lease names it) runs `sys.executable`."""
  return _WARM.get('python', sys.executable)


def devices_env(count: int) -> dict[str, str]:
  """The environment for a command that sees `count` CPU devices (and the suite's flags)."""
  flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={count}"
  return dict(os.environ, XLA_FLAGS=flags.strip())


def tiny_config(data_dir, **overrides):
  """The default digits config with a tiny VGG-11 on 640 images: seconds per run."""
  spec = importlib.util.spec_from_file_location('default_config', DEFAULT_CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.data_dir = str(data_dir)
  config.model.depth = 11
  config.model.width = 8
  config.model.fc_dim = 32
  config.model.dropout_rate = 0.0
  # lax.conv compiles in about half the time of the CPU's Winograd lowering, the
  # same parameters either way; the CLI tests (robustness_test, train_test's
  # command lines) keep the default 'auto'.
  config.model.conv_impl = 'xla'
  config.train_split = 'train[:640]'  # 20 steps of 32 per epoch.
  config.batch_size = 32
  config.learning_rate = 3e-3
  config.num_epochs = 2
  config.log_every_steps = 10
  config.input.shuffle_buffer = 512
  return override(config, **overrides)


def override(config, **overrides):
  """Sets dotted fields: override(config, **{'model.depth': 11, 'batch_size': 8})."""
  for key, value in overrides.items():
    target = config
    *parents, leaf = key.split('.')
    for p in parents:
      target = target[p]
    target[leaf] = value
  return config


def metrics_text(workdir):
  """The run's metrics.jsonl as written (local or gs://)."""
  from vgg_flax.io import storage  # pylint: disable=g-import-not-at-top
  return storage.path(workdir).joinpath('metrics.jsonl').read_text()


def assert_resumed(log, before, after, step):
  """A relaunch resumed at checkpoint `step` and trained nothing before it again.

  Args:
    log: the relaunch's log: it must say 'Resumed from step {step} of'.
    before: metrics.jsonl before the relaunch.
    after: metrics.jsonl after it: its rows up to `step` are the ones written
      before, byte for byte (a step trained again logs a new throughput), and
      every later row is past `step`.
    step: the checkpoint it must have resumed from.
  """
  import json  # pylint: disable=g-import-not-at-top
  assert f'Resumed from step {step} of' in log, log[-3000:]
  kept = [l for l in before.splitlines(keepends=True) if json.loads(l)['step'] <= step]
  assert kept, 'nothing was logged before the interrupt'
  assert after.startswith(''.join(kept)), 'rows before the resume step were written again'
  assert all(json.loads(l)['step'] > step for l in after[len(''.join(kept)):].splitlines())
