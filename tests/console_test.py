"""Issue 23: a clean console. No rate or ETA before a step was timed, no library warning
that says nothing, and `python -m vgg_flax` lists the commands.

The whole output of real trainer, evaluate and predict runs is checked in
image_folder_test (`_assert_clean`).
"""

import importlib
import logging
import os
import subprocess

import numpy as np
import orbax.checkpoint as ocp
import pytest

from vgg_flax import __main__ as commands
from vgg_flax.interop import transfer
from vgg_flax.runtime import quiet
from vgg_flax.training import reporting

from helpers import python

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Clock:
  def __init__(self):
    self.now = 1000.0

  def perf_counter(self):
    return self.now


def test_a_report_with_no_timed_step_shows_no_rate_eta_or_mfu(monkeypatch):
  clock = _Clock()
  monkeypatch.setattr(reporting, 'time', clock)
  progress = reporting.Progress(total_steps=100, batch_size=10, start_step=0)
  clock.now += 30.0
  progress.restart_after(np.ones(2), 1)  # The first step, compilation included.
  speed = progress.update(1)  # A report at once (log_every_steps=1, or a 1-step epoch).
  assert reporting.throughput(speed, 1e9, 1e12) == {}
  assert progress.line(1, 0.01, {'train_loss': 2.5}, speed, mfu=None) == (
      'step 1/100 (epoch 0.01) train_loss=2.5')
  clock.now += 2.0  # Steps 2-11 take 2 s: 50 img/s, 5% of a 1 TFLOP/s peak at 1 GFLOP each.
  speed = progress.update(11)
  rates = reporting.throughput(speed, 1e9, 1e12)
  assert rates == {'train_images_per_sec': 50.0, 'train_mfu': pytest.approx(0.05)}
  assert progress.line(11, 0.11, {'train_loss': 2.0}, speed, rates['train_mfu']) == (
      'step 11/100 (epoch 0.11) train_loss=2 | 50.0 img/s | ETA 0m17s mfu=5.0%')


@pytest.fixture
def checkpoint_item(tmp_path):
  """The `state` item of a step saved as the trainer saves: step/_CHECKPOINT_METADATA, step/state."""
  with ocp.CheckpointManager(tmp_path / 'ckpt', item_names=('state',)) as manager:
    manager.save(1, args=ocp.args.Composite(
        state=ocp.args.PyTreeSave({'params': {'w': np.ones(2, np.float32)}})))
    manager.wait_until_finished()
  return tmp_path / 'ckpt' / '1' / 'state'


def test_restoring_a_checkpoint_item_warns_no_more(checkpoint_item, caplog, monkeypatch):
  caplog.set_level(logging.WARNING)
  variables = transfer.restore_checkpoint_variables(checkpoint_item)  # What predict calls.
  np.testing.assert_array_equal(variables['params']['w'], np.ones(2))
  assert caplog.records == []
  # Without vgg_flax's filter, orbax does warn (so the check above can fail).
  monkeypatch.setattr(logging.getLogger('absl'), 'filters', [])
  transfer.restore_checkpoint_variables(checkpoint_item)
  assert [r.getMessage() for r in caplog.records] == [
      f'Metadata file does not exist: {checkpoint_item}/_CHECKPOINT_METADATA']


def test_other_library_warnings_still_show():
  record = logging.LogRecord('absl', logging.WARNING, '/x/orbax/checkpoint/y.py', 1,
                             'Metadata file does not exist: %s', ('/run/other.json',), None)
  assert quiet._KnownWarnings().filter(record)  # pylint: disable=protected-access
  record.args = ('/run/1/state/_CHECKPOINT_METADATA',)
  assert not quiet._KnownWarnings().filter(record)  # pylint: disable=protected-access


def _python_m(*args):
  return subprocess.run([python(), '-m', *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=120)


def test_python_m_vgg_flax_lists_the_commands_with_their_docstrings():
  done = _python_m('vgg_flax')
  assert done.returncode == 0 and done.stderr == ''
  names = ('train', 'evaluate', 'predict', 'convert', 'sweep', 'aot', 'benchmark', 'summary')
  lines = done.stdout.splitlines()
  assert lines[:3] == ['usage: python -m vgg_flax.COMMAND [flags]  (--helpshort after a command '
                       'lists its flags)', '', 'commands:']
  # Each line is the first line of the command's docstring (read here by importing it).
  assert lines[3:] == [
      f'  {name:<9}  {importlib.import_module("vgg_flax." + name).__doc__.splitlines()[0]}'
      for name in names]
  assert commands.COMMANDS == names


def test_python_m_vgg_flax_runs_a_command_or_names_a_wrong_one(tmp_path):
  done = _python_m('vgg_flax', 'train', f'--workdir={tmp_path}', '--config.batch_size=0')
  assert (done.returncode, done.stdout + done.stderr) == (
      2, 'error: config.batch_size=0 is not allowed: must be > 0.\n')
  done = _python_m('vgg_flax', 'trian')
  assert (done.returncode, done.stderr) == (
      2, "error: 'trian' is not a vgg_flax command; expected one of train, evaluate, predict, "
      'convert, sweep, aot, benchmark, summary (python -m vgg_flax lists them).\n')
