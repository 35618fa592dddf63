"""The paper's plateau schedule in the trainer: drops on the monitored eval metric, decided
by the host, handed to the step as data, checkpointed and resumed bit for bit."""

import contextlib
import logging as std_logging
import os
import signal
import threading
import time

import jax
import numpy as np
import pytest

from vgg_flax.io import storage
from vgg_flax import train
from vgg_flax.training import reporting

from helpers import assert_resumed, metrics_text, tiny_config
from robustness_test import _final_state, _flatten  # pylint: disable=g-bad-import-order

PATIENCE = 1
# 5 steps per epoch, an evaluation per epoch on 40 test digits. At this rate and
# without BatchNorm (whose statistics move at any rate) no prediction changes:
# the accuracy stalls from the second evaluation on, on any CPU, so the rate
# drops at steps 10, 15 and 20 (then min_scale stops it), while every step still
# changes the parameters' bits.
PLATEAU = {'schedule.name': 'plateau', 'schedule.patience': PATIENCE, 'model.batch_norm': False,
           'schedule.warmup_epochs': 0.0, 'learning_rate': 1e-5, 'train_split': 'train[:160]',
           'eval_split': 'test[:40]', 'num_epochs': 6, 'log_every_steps': 5,
           'checkpoint.keep': 1}
STEPS = 30


@pytest.fixture(scope='module')
def data_dir(digits):
  return digits


class _Compilations(std_logging.Handler):
  """Counts the compilations of the train step that jax.log_compiles reports."""

  def __init__(self):
    super().__init__()
    self.count = 0

  def emit(self, record):
    self.count += record.getMessage().startswith('Compiling jit(train_step)')


@contextlib.contextmanager
def _counting_compilations():
  handler, logger = _Compilations(), std_logging.getLogger('jax._src.interpreters.pxla')
  logger.addHandler(handler)
  try:
    with jax.log_compiles():
      yield handler
  finally:
    logger.removeHandler(handler)


def _rows(workdir):
  return reporting.read_metrics(os.path.join(workdir, 'metrics.jsonl'))


def _expected_scales(accuracies, patience, factor=0.1, min_scale=1e-3):
  """The paper's rule, written out: /10 after `patience` evaluations without a new best."""
  best, waited, scale, scales = None, 0, 1.0, []
  for accuracy in accuracies:
    improved = best is None or accuracy > best
    best = accuracy if improved else best
    waited = 0 if improved else waited + 1
    if waited >= patience and scale * factor >= min_scale * (1 - 1e-6):
      scale, waited = scale * factor, 0
    scales.append(scale)
  return scales


@pytest.fixture(scope='module')
def reference(tmp_path_factory, data_dir):
  """The uninterrupted run, and how many times it compiled the train step."""
  workdir = str(tmp_path_factory.mktemp('reference'))
  with _counting_compilations() as compilations:
    train.train_and_evaluate(tiny_config(data_dir, **PLATEAU), workdir)
  return workdir, compilations.count


def test_the_rate_drops_when_eval_accuracy_stalls_and_the_step_compiles_once(reference):
  workdir, compilations = reference
  rows = _rows(workdir)
  evals = [(r['step'], r['eval_accuracy']) for r in rows if 'eval_accuracy' in r]
  scales = [(r['step'], r['lr_scale']) for r in rows if 'lr_scale' in r]
  assert [s for s, _ in evals] == [s for s, _ in scales] == list(range(5, STEPS + 1, 5))
  expected = _expected_scales([a for _, a in evals], PATIENCE)
  np.testing.assert_allclose([s for _, s in scales], expected, rtol=1e-9)
  assert [s for _, s in scales] == pytest.approx([1, 0.1, 0.01, 0.001, 0.001, 0.001]), evals
  assert compilations == 1  # Drops are data, not a new program.
  # Each step trains at base rate x the scale decided at the last evaluation before it.
  base = PLATEAU['learning_rate']
  for row in (r for r in rows if 'learning_rate' in r):
    decided = [s for step, s in scales if step < row['step']]
    assert row['learning_rate'] == pytest.approx(base * (decided[-1] if decided else 1.0),
                                                 rel=1e-6), row
  with open(os.path.join(workdir, 'result.json')) as f:
    assert '"final_eval": null' in f.read()  # eval.at_end is off here.


def _send_sigterm_after_checkpoint(workdir, step, stop):
  """SIGTERM to this process once a checkpoint at `step` or later is on disk."""
  latest = os.path.join(workdir, 'checkpoints', 'latest')
  while not stop.is_set():
    if os.path.isdir(latest) and any(d.isdigit() and int(d) >= step for d in os.listdir(latest)):
      os.kill(os.getpid(), signal.SIGTERM)
      return
    time.sleep(0.01)


@pytest.mark.resume
def test_sigterm_and_resume_give_the_same_drops_bit_for_bit(reference, data_dir, tmp_path,
                                                            caplog):
  # pytest and xdist's workers run tests in the main thread, where signals land.
  assert threading.current_thread() is threading.main_thread()
  ref, _ = reference
  first_drop = next(r['step'] for r in _rows(ref) if r.get('lr_scale', 1.0) < 1.0)
  assert first_drop < STEPS - 5
  workdir = str(tmp_path / 'run')
  stop = threading.Event()
  sender = threading.Thread(target=_send_sigterm_after_checkpoint,
                            args=(workdir, first_drop, stop))
  # A SIGTERM that came after the trainer's own handler is gone must not end pytest.
  previous = signal.signal(signal.SIGTERM, lambda *_: None)
  try:
    sender.start()
    train.train_and_evaluate(tiny_config(data_dir, **PLATEAU), workdir)
  finally:
    stop.set()
    sender.join()
    signal.signal(signal.SIGTERM, previous)
  saved, _ = _final_state(workdir)
  assert first_drop < saved < STEPS  # Stopped after a drop, before the end.
  assert not storage.exists(os.path.join(workdir, 'result.json'))
  before = metrics_text(workdir)
  with caplog.at_level(std_logging.INFO, logger='absl'):
    train.train_and_evaluate(tiny_config(data_dir, **PLATEAU), workdir)  # Resumes.
  assert_resumed(caplog.text, before, metrics_text(workdir), saved)

  step, state = _final_state(workdir)
  ref_step, ref_state = _final_state(ref)
  assert step == ref_step == STEPS
  for key in ('params', 'batch_stats', 'opt_state'):  # opt_state holds the scale.
    flat, expected = (sorted(_flatten(s[key]).items()) for s in (state, ref_state))
    assert [k for k, _ in flat] == [k for k, _ in expected]
    for (name, a), (_, b) in zip(flat, expected):
      np.testing.assert_array_equal(a, b, err_msg=f'{key}/{name}')

  def decisions(run):  # The stopped run also logged its last step: rows at the log steps.
    return [{k: v for k, v in r.items() if k in ('step', 'eval_accuracy', 'eval_loss', 'lr_scale',
                                                  'learning_rate')}
            for r in _rows(run) if r['step'] % PLATEAU['log_every_steps'] == 0]
  assert decisions(workdir) == decisions(ref)
