"""Storage that stops answering: the real GCS-API server frozen (SIGSTOP) under the trainer.

A bucket silent for good stops the trainer within config.storage.timeout_s,
naming the bucket and what it was doing, with every checkpoint saved before
kept; a freeze of 40 s at the default deadline is ridden out (one freeze, with
both trainers on it: the two waits are one).
"""

import os
import re
import subprocess
import threading
import time

import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
import pytest

from vgg_flax.io import clients
from vgg_flax.io import storage
from vgg_flax.training import checkpoint
from vgg_flax.training import lease
from vgg_flax.training import reporting
from vgg_flax.training import step

from helpers import DEFAULT_CONFIG, ROOT, assert_resumed, metrics_text, python

# A tiny VGG-11 on 320 digits (10 steps per epoch), a checkpoint every 4 steps.
TINY = ['--config.model.depth=11', '--config.model.width=8', '--config.model.fc_dim=32',
        '--config.train_split=train[:320]', '--config.batch_size=32',
        '--config.learning_rate=0.003', '--config.input.shuffle_buffer=512',
        '--config.model.conv_impl=xla', '--config.checkpoint.every_steps=4']
STOPPED = ('bucket {bucket} did not answer for {seconds} s while {doing}; stopped '
           '(config.storage.timeout_s={timeout}). What was saved before is kept: run the same '
           'command again once the storage answers.')


@pytest.fixture(scope='module')
def data_dir(digits):
  return digits


@pytest.fixture
def deadline():
  """clients.set_timeout for this process, back to the default after the test."""
  yield clients.set_timeout
  clients.set_timeout(clients.DEFAULT_TIMEOUT_S)


def _within(timeout_s, fn):
  """What `fn()` raised (None if it returned), failing the test if it blocks past `timeout_s`."""
  outcome = []

  def target():
    try:
      fn()
      outcome.append(None)
    except Exception as e:  # pylint: disable=broad-except
      outcome.append(e)

  thread = threading.Thread(target=target, daemon=True)  # Left behind if it never returns.
  thread.start()
  thread.join(timeout_s)
  assert outcome, f'still blocked after {timeout_s} s'
  return outcome[0]


def _wait_for(predicate, what, timeout_s=120.0):
  deadline = time.monotonic() + timeout_s
  while not (value := predicate()):
    assert time.monotonic() < deadline, f'timed out waiting for {what}'
    time.sleep(0.05)
  return value


def test_a_frozen_bucket_stops_reads_and_the_lease_at_the_deadline(gcs_server, gcs_bucket,
                                                                     deadline):
  deadline(2)
  run = f'{gcs_bucket}/runs/x'
  storage.write_text(f'{run}/config.json', '{}')
  held = lease.acquire(run, stale_after_s=30, refresh_s=0.2)
  gcs_server.freeze()
  try:
    start = time.monotonic()
    error = _within(30, lambda: storage.read_text(f'{run}/config.json'))
    assert 2 <= time.monotonic() - start < 10
    assert isinstance(error, storage.StorageTimeoutError) and str(error) == STOPPED.format(
        bucket=gcs_bucket, seconds=2, doing=f'reading {run}/config.json', timeout=2), error
    failed = _wait_for(held.failed, 'the lease to fail', 30)
    assert re.fullmatch(re.escape(STOPPED.format(
        bucket=gcs_bucket, seconds='SECONDS', doing=f'refreshing the workdir lease '
        f'{run}/lease.json', timeout=2)).replace('SECONDS', r'\d+'), str(failed)), failed
  finally:
    gcs_server.thaw()
  assert storage.read_text(f'{run}/config.json') == '{}'  # It answers again.
  _wait_for(lambda: held.failed() is None, 'a refresh once thawed', 60)
  held.release()
  assert lease.read_holder(run) is None


def test_a_checkpoint_save_on_a_frozen_bucket_stops_at_the_deadline(gcs_server, gcs_bucket,
                                                                    deadline):
  # Unbounded, the save's own listing and folder creation (gcsfs, 6 tries with
  # back-off) raised after 52 s on a 20 s deadline; the trainer then stopped
  # 72 s after the freeze.
  deadline(2)
  run = f'{gcs_bucket}/ckpt'
  ckpt = checkpoint.Checkpointer(run, keep=2)
  state = _tiny_state()
  ckpt.save(state, {})
  ckpt.wait()
  gcs_server.freeze()
  try:
    start = time.monotonic()
    error = _within(60, lambda: ckpt.save(state.replace(step=1), {}))
    assert time.monotonic() - start < 10, time.monotonic() - start
  finally:
    gcs_server.thaw()
  assert isinstance(error, storage.StorageTimeoutError) and str(error) == STOPPED.format(
      bucket=gcs_bucket, seconds=2, doing=f'writing a checkpoint to {run}/checkpoints/latest',
      timeout=2), error
  assert _saved_steps(run) == [0]


def _tiny_state():
  params = {'w': jnp.ones((3, 4))}
  return step.TrainState.create(apply_fn=None, params=params, tx=optax.sgd(0.1),
                                batch_stats={}, rng=jax.random.PRNGKey(0))


def _start(workdir, data_dir, log, *extra):
  with open(log, 'w') as f:
    return subprocess.Popen(
        [python(), '-m', 'vgg_flax.train', f'--config={DEFAULT_CONFIG}',
         f'--workdir={workdir}', f'--config.data_dir={data_dir}', *TINY, *extra],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=f)


def _saved_steps(workdir):
  """The complete checkpoints (on a bucket, a step's folder is listed while it is written)."""
  folder = storage.path(workdir) / 'checkpoints' / 'latest'
  return sorted(int(n) for n in storage.listdir(folder)
                if n.isdigit() and ocp.utils.is_checkpoint_finalized(folder / n))


def _freeze_under_two_trainers(server, data_dir, tmp):
  """Two trainers on `server` when it freezes, mid-run: one with a 20 s deadline, one
  with the default (600 s). One wait for both: the server thaws 40 s after the
  freeze, once the first has stopped."""
  timeout_s = 20
  runs = {'stops': (f'{server.create_bucket(f"stops-{os.urandom(4).hex()}")}/vgg',
                    ('--config.num_epochs=20', f'--config.storage.timeout_s={timeout_s}')),
          'rides': (f'{server.create_bucket(f"rides-{os.urandom(4).hex()}")}/vgg',
                    ('--config.num_epochs=6',))}
  procs = {name: _start(workdir, data_dir, tmp / f'{name}.log', *extra)
           for name, (workdir, extra) in runs.items()}
  try:
    def saved():
      for name, proc in procs.items():
        assert proc.poll() is None, (tmp / f'{name}.log').read_text()[-3000:]
      steps = {name: _saved_steps(workdir) for name, (workdir, _) in runs.items()}
      return steps if all(steps.values()) else None

    steps = _wait_for(saved, 'a checkpoint of each run', 240)
    server.freeze()
    frozen = time.monotonic()
    code = procs['stops'].wait(timeout=timeout_s + 120)
    seconds = time.monotonic() - frozen
    time.sleep(max(0.0, frozen + 40 - time.monotonic()))
    blocked = procs['rides'].poll() is None  # On the bucket, not stopped.
    server.thaw()
    rides_code = procs['rides'].wait(timeout=300)
  finally:
    server.thaw()
    for proc in procs.values():
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  return (dict(workdir=runs['stops'][0], saved=steps['stops'], code=code, seconds=seconds,
               timeout_s=timeout_s, log=tmp / 'stops.log'),
          dict(workdir=runs['rides'][0], blocked=blocked, code=rides_code, log=tmp / 'rides.log'))


@pytest.mark.resume
def test_a_frozen_bucket_stops_a_trainer_at_its_deadline_and_one_at_the_default_rides_it_out(
    gcs_server, data_dir, tmp_path):
  stops, rides = _freeze_under_two_trainers(gcs_server, data_dir, tmp_path)
  # At the default deadline, a freeze of 40 s is ridden out.
  log = rides['log'].read_text()
  assert rides['blocked'], log[-3000:]  # On the bucket, not stopped.
  assert rides['code'] == 0, log[-3000:]
  assert storage.read_json(f"{rides['workdir']}/result.json")['step'] == 60
  assert _saved_steps(rides['workdir'])[-1] == 60
  rows = reporting.read_metrics(f"{rides['workdir']}/metrics.jsonl")
  assert [r['step'] for r in rows if 'eval_loss' in r] == [10, 20, 30, 40, 50, 60]
  # At a deadline of 20 s, the trainer stops, naming the bucket...
  workdir, saved, code, seconds, timeout_s = (
      stops[k] for k in ('workdir', 'saved', 'code', 'seconds', 'timeout_s'))
  gcs_bucket = workdir.rsplit('/', 1)[0]
  stderr = stops['log'].read_text()
  assert code == 1, stderr[-3000:]
  assert timeout_s - 5 < seconds < timeout_s + 30, seconds  # From the wait in flight.
  # Whichever the trainer was waiting on: a checkpoint, metrics.jsonl, TensorBoard events.
  doing = (re.escape(f'writing a checkpoint to {workdir}/checkpoints/') + '(latest|best)|'
           + re.escape(f'writing {workdir}/') + r'(metrics\.jsonl|events\.out\.tfevents\.[\w.]+)')
  assert re.fullmatch('error: ' + re.escape(STOPPED.format(
      bucket=gcs_bucket, seconds=timeout_s, doing='DOING', timeout=timeout_s)).replace(
          'DOING', f'({doing})'), stderr.splitlines()[-1]), stderr[-3000:]
  # What was saved before the freeze is intact...
  latest = _saved_steps(workdir)
  assert set(saved) <= set(latest), (saved, latest)
  for step in saved:
    with ocp.StandardCheckpointer() as ckptr:
      state = ckptr.restore(storage.path(workdir) / 'checkpoints' / 'latest' / str(step) / 'state')
    assert int(state['step']) == step
  # ...and the same command resumes from it (here to the end of that epoch).
  before = metrics_text(workdir)
  relaunch = _start(workdir, data_dir, tmp_path / 'resume.log',
                    f'--config.num_epochs={latest[-1] // 10 + 1}')
  assert relaunch.wait(timeout=300) == 0, (tmp_path / 'resume.log').read_text()[-3000:]
  resumed = (tmp_path / 'resume.log').read_text()
  assert 'Taking over the lease' in resumed  # Left by the stopped trainer, its process gone.
  assert_resumed(resumed, before, metrics_text(workdir), latest[-1])

