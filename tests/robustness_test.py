"""Issue 5: same answer on 1 and 8 devices and on 2 hosts; exact resume after SIGTERM/SIGKILL; faults."""

import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from vgg_flax.io import storage
from vgg_flax import train
from vgg_flax.training import checkpoint
from vgg_flax.training import reporting

from helpers import assert_resumed, devices_env, metrics_text, python, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(ROOT, 'configs', 'default.py')
# A tiny VGG-11 on 320 digits: 10 steps of 32 per epoch.
# lax.conv: it compiles in about half the CPU Winograd lowering's time, and every
# trainer process here compiles its own step; train_test's command lines and
# `make train` run the default 'auto'.
TINY = ['--config.model.depth=11', '--config.model.width=8', '--config.model.fc_dim=32',
        '--config.train_split=train[:320]', '--config.batch_size=32',
        '--config.learning_rate=0.003', '--config.input.shuffle_buffer=512',
        '--config.model.conv_impl=xla']


def _command(workdir, data_dir, *extra):
  """The trainer's command line (signals sent to the warm `python` reach the trainer)."""
  return [python(), '-m', 'vgg_flax.train',
          f'--config={DEFAULT_CONFIG}',
          f'--workdir={workdir}', f'--config.data_dir={data_dir}', *TINY, *extra]


def _env(devices):
  return devices_env(devices)


def _run(cmd, devices=1, timeout=300):
  result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=_env(devices))
  assert result.returncode == 0, result.stderr[-4000:]
  return result


def _losses(workdir):
  rows = reporting.read_metrics(os.path.join(workdir, 'metrics.jsonl'))
  return [(r['step'], r['train_loss']) for r in rows if 'train_loss' in r]


def _final_state(workdir):
  """The raw arrays of the newest checkpoint, as saved (local or gs://)."""
  step_dir = storage.path(workdir) / 'checkpoints' / 'latest'
  step = max(int(d) for d in storage.listdir(step_dir) if d.isdigit())
  with ocp.StandardCheckpointer() as ckptr:
    return step, ckptr.restore(step_dir / str(step) / 'state')


@pytest.fixture(scope='module')
def data_dir(digits):
  return digits


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory, data_dir):
  """3 epochs (30 steps) in one go: the reference for the resume tests."""
  workdir = str(tmp_path_factory.mktemp('reference'))
  _run(_command(workdir, data_dir, '--config.num_epochs=3', '--config.log_every_steps=2'))
  return workdir


@pytest.fixture(scope='module')
def one_device(tmp_path_factory, data_dir):
  """One epoch (10 steps) on one device, every step logged: the reference of the two below."""
  workdir = str(tmp_path_factory.mktemp('one_device'))
  result = _run(_command(workdir, data_dir, '--config.num_epochs=1', '--config.log_every_steps=1'))
  assert 'on 1 devices' in result.stderr
  losses = _losses(workdir)
  assert [s for s, _ in losses] == list(range(1, 11))
  return losses


def test_one_and_eight_devices_give_the_same_losses(tmp_path, data_dir, one_device):
  # The 8 devices hold the state split over them (state_sharding='fsdp'; a
  # replicated 8-device run: train_test.py): the same losses either way.
  workdir = str(tmp_path / 'd8')
  result = _run(_command(workdir, data_dir, '--config.num_epochs=1',
                         '--config.log_every_steps=1', '--config.state_sharding=fsdp'),
                devices=8)
  assert 'on 8 devices' in result.stderr
  # Sharded reductions sum in another order; the differences compound over steps.
  np.testing.assert_allclose([l for _, l in _losses(workdir)], [l for _, l in one_device],
                             rtol=2e-3)


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _two_processes(workdir, data_dir, port, *extra):
  """The same command on two 'hosts' (processes on 127.0.0.1), 2 CPU devices each."""
  return [subprocess.Popen(
      _command(workdir, data_dir, *extra, f'--coordinator_address=127.0.0.1:{port}',
               '--num_processes=2', f'--process_id={i}', '--heartbeat_timeout_s=20'),
      cwd=ROOT, env=dict(_env(2), PYTHONFAULTHANDLER='1'), stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for i in range(2)]


def _outputs(procs, timeout_s=540):
  """Each process's output; on a hang, every thread's Python stack (faulthandler)."""
  deadline = time.time() + timeout_s  # Generous: CI runs another test beside it on 2 cores.
  try:
    return [p.communicate(timeout=max(1, deadline - time.time()))[0] for p in procs]
  except subprocess.TimeoutExpired:
    for p in procs:
      if p.poll() is None:
        os.kill(p.pid, signal.SIGABRT)
    outputs = [p.communicate(timeout=30)[0] for p in procs]
    pytest.fail('the two processes did not finish:\n' + '\n'.join(
        f'--- process {i}:\n{out[-6000:]}' for i, out in enumerate(outputs)))
  finally:
    for p in procs:  # Never leave a process behind, whatever happened.
      if p.poll() is None:
        os.kill(p.pid, signal.SIGKILL)


def _read_until(proc, text, timeout_s):
  """proc's output up to the first line holding `text` (or its end, or the timeout)."""
  lines = []

  def read():
    for line in proc.stdout:
      lines.append(line)
      if text in line:
        return
  reader = threading.Thread(target=read, daemon=True)
  reader.start()
  reader.join(timeout_s)
  return ''.join(lines)


@pytest.mark.resume
def test_a_dead_process_stops_its_peer_cleanly_and_the_run_resumes_on_two_processes(
    tmp_path, data_dir, uninterrupted):
  # Regression: the survivor aborted 65 s later with a C++ check failure and a
  # 137-line fatal-error dump. Now it stops within the heartbeat timeout (20 s
  # here), says why and how to resume; the same command on both resumes.
  multi = str(tmp_path / 'multi')
  args = ('--config.num_epochs=3', '--config.log_every_steps=2',
          '--config.checkpoint.every_steps=4')
  procs = _two_processes(multi, data_dir, _free_port(), *args)
  latest = os.path.join(multi, 'checkpoints', 'latest')
  try:
    deadline = time.time() + 300
    while time.time() < deadline and all(p.poll() is None for p in procs) and not (
        os.path.isdir(latest) and any(d.isdigit() for d in os.listdir(latest))):
      time.sleep(0.05)
    os.kill(procs[1].pid, signal.SIGKILL)
    killed_at = time.time()
    survivor = procs[0].communicate(timeout=120)[0]
    seconds = time.time() - killed_at
    print(f'process 0 stopped {seconds:.1f} s after process 1 was killed')
  finally:
    _outputs(procs, timeout_s=60)
  assert procs[0].returncode == 1, survivor[-4000:]
  assert seconds < 20, seconds
  assert re.search(r'error: a process of this 2-process run is gone \(.+\); process 0 stopped. '
                   rf'The checkpoints saved so far are kept in {re.escape(multi)}: run the same '
                   r'command on every host to resume.', survivor), survivor[-4000:]
  assert 'Fatal Python error' not in survivor and 'terminate called' not in survivor
  saved = max(int(d) for d in os.listdir(latest) if d.isdigit())
  assert 4 <= saved < 30  # Killed before the end.
  before = metrics_text(multi)

  procs = _two_processes(multi, data_dir, _free_port(), *args)
  try:  # Whether it resumed is known before its first step: a restart is not waited for.
    head = _read_until(procs[0], 'First step', timeout_s=300)
    assert f'Resumed from step {saved} of' in head, head[-4000:]
  except BaseException:
    for p in procs:
      p.kill()
      p.communicate(timeout=30)
    raise
  outputs = _outputs(procs)
  outputs[0] = head + outputs[0]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-4000:]
  assert 'Process 1 of 2; 2 local and 4 global devices.' in outputs[1]
  # Regression: process 1 measured process 0's device (a remote one): it logged
  # 'peak 3611492 GFLOP/s' and mfu=0.0%. Each process measures a local device.
  for out in outputs:
    peak = float(re.search(r'peak (\d+) GFLOP/s per device \(measured', out).group(1))
    assert 0 < peak < 20_000, out[-2000:]
  assert_resumed(outputs[0], before, metrics_text(multi), saved)
  # Two processes train what one does: reductions run in another order across
  # processes, and the differences compound over steps (0.16% at step 12, 1.6% by 30).
  losses, reference = (np.array([l for _, l in _losses(run)]) for run in (multi, uninterrupted))
  assert len(losses) == len(reference) == 15
  np.testing.assert_allclose(losses[:6], reference[:6], rtol=2e-3)
  np.testing.assert_allclose(losses, reference, rtol=0.05)
  assert os.path.exists(os.path.join(multi, 'curves.png'))


def _interrupt(workdir, data_dir, sig, poll_s=0.2):
  """Starts the 30-step run, sends `sig` once step >= 12 is logged.

  Returns:
    The exit code, the run's stderr, and metrics.jsonl as the interrupted run left it.
  """
  proc = subprocess.Popen(
      _command(workdir, data_dir, '--config.num_epochs=3', '--config.log_every_steps=2',
               '--config.checkpoint.every_steps=4'),
      cwd=ROOT, env=_env(1), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 150
  try:
    while time.time() < deadline and proc.poll() is None:
      path = os.path.join(workdir, 'metrics.jsonl')
      if storage.exists(path) and any(s >= 12 for s, _ in _losses(workdir)):
        break
      time.sleep(poll_s)
    assert proc.poll() is None, 'the run ended before it could be interrupted'
    os.kill(proc.pid, sig)
    _, stderr = proc.communicate(timeout=60)
  finally:
    if proc.poll() is None:
      os.kill(proc.pid, signal.SIGKILL)
  return proc.returncode, stderr, metrics_text(workdir)


@pytest.mark.resume
def test_sigterm_saves_the_current_step_and_resume_is_bit_identical(
    tmp_path, data_dir, uninterrupted):
  workdir = str(tmp_path / 'run')
  code, stderr, before = _interrupt(workdir, data_dir, signal.SIGTERM)
  assert code == 0, stderr[-3000:]
  saved, _ = _final_state(workdir)
  assert f'Stopped by SIGTERM: saved step {saved} in' in stderr
  assert 12 <= saved < 30
  result = _run(_command(workdir, data_dir, '--config.num_epochs=3', '--config.log_every_steps=2',
                         '--config.checkpoint.every_steps=4'))
  assert_resumed(result.stderr, before, metrics_text(workdir), saved)
  _assert_same_run(workdir, uninterrupted)


@pytest.mark.resume
def test_sigkill_resumes_from_the_last_complete_checkpoint_bit_identical(
    tmp_path, data_dir, uninterrupted):
  workdir = str(tmp_path / 'run')
  code, _, before = _interrupt(workdir, data_dir, signal.SIGKILL)
  assert code == -signal.SIGKILL
  ckpt_dir = os.path.join(workdir, 'checkpoints', 'latest')
  complete = [d for d in os.listdir(ckpt_dir) if d.isdigit()]
  assert complete and all(int(d) % 4 == 0 or int(d) % 10 == 0 for d in complete)
  saved = max(int(d) for d in complete)
  assert saved < 30
  assert os.path.exists(os.path.join(workdir, 'lease.json'))  # Left by the killed trainer.
  result = _run(_command(workdir, data_dir, '--config.num_epochs=3', '--config.log_every_steps=2',
                         '--config.checkpoint.every_steps=4'))
  assert 'Taking over the lease' in result.stderr  # Its process is gone: stale.
  assert_resumed(result.stderr, before, metrics_text(workdir), saved)
  _assert_same_run(workdir, uninterrupted)


@pytest.mark.resume
def test_a_bucket_workdir_holds_every_artifact_and_resumes_exactly_after_ctrl_c(
    gcs_server, data_dir, uninterrupted, tmp_path):
  # gs:// on a real GCS-API server, with only STORAGE_EMULATOR_HOST set; Ctrl-C
  # (SIGINT) saves as SIGTERM does (the test above).
  import gcs  # pylint: disable=g-import-not-at-top
  workdir = gcs_server.create_bucket('runs') + '/vgg'
  code, stderr, before = _interrupt(workdir, data_dir, signal.SIGINT, poll_s=1.0)
  assert code == 0, stderr[-3000:]
  saved, _ = _final_state(workdir)
  assert f'Stopped by Ctrl-C: saved step {saved} in' in stderr
  assert 12 <= saved < 30  # The interrupt landed before the end.
  result = _run(_command(workdir, data_dir, '--config.num_epochs=3', '--config.log_every_steps=2',
                         '--config.checkpoint.every_steps=4'))
  assert_resumed(result.stderr, before, metrics_text(workdir), saved)
  _assert_same_run(workdir, uninterrupted)
  names = storage.listdir(workdir)
  assert {'config.json', 'dataset.json', 'metrics.jsonl', 'result.json', 'curves.png',
          'checkpoints'} <= set(names), names
  assert any(n.startswith('events.out.tfevents.') for n in names), names
  assert 'lease.json' not in names  # Released at exit.
  assert gcs.local_leftovers(ROOT) == [] and gcs.local_leftovers(str(tmp_path)) == []
  # The tools read the run where it is (in this process: the CLIs are tested elsewhere).
  from vgg_flax import evaluate, predict  # pylint: disable=g-import-not-at-top
  result = storage.read_json(workdir + '/result.json')
  evaluated = evaluate.evaluate_workdir(workdir, checkpoint='latest')
  assert evaluated['step'] == 30
  assert evaluated['eval_accuracy'] == pytest.approx(result['eval']['eval_accuracy'], abs=1e-6)
  image = tmp_path / 'digit.png'
  import PIL.Image  # pylint: disable=g-import-not-at-top
  PIL.Image.fromarray(np.full((32, 32), 200, np.uint8)).save(image)
  [top] = predict.predict(workdir, [str(image)], top_k=3)
  names = storage.read_json(workdir + '/dataset.json')['class_names']
  assert len(top) == 3 and {name for name, _ in top} <= set(names)
  assert 0 < sum(p for _, p in top) <= 1 + 1e-6


def _assert_same_run(workdir, reference):
  step, state = _final_state(workdir)
  ref_step, ref_state = _final_state(reference)
  assert step == ref_step == 30
  for key in ('params', 'batch_stats', 'opt_state'):
    flat, ref = (sorted(_flatten(s[key]).items()) for s in (state, ref_state))
    assert [k for k, _ in flat] == [k for k, _ in ref]
    for (name, a), (_, b) in zip(flat, ref):
      np.testing.assert_array_equal(a, b, err_msg=f'{key}/{name}')  # Bit for bit.
  def evals(run):  # eval_seconds is the one value that may differ.
    return [{k: v for k, v in r.items() if k.startswith('eval_') and k != 'eval_seconds'}
            for r in reporting.read_metrics(os.path.join(run, 'metrics.jsonl'))
            if 'eval_loss' in r]
  evals, ref_evals = evals(workdir), evals(reference)
  assert evals == ref_evals and len(evals) == 3


def _flatten(tree, prefix=''):
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, f'{prefix}/{k}'))
    return out
  if isinstance(tree, (list, tuple)):
    out = {}
    for i, v in enumerate(tree):
      out.update(_flatten(v, f'{prefix}/{i}'))
    return out
  return {prefix: np.asarray(tree)}


# In-process fault tests: a tiny config built like the CLI's.


def _config(data_dir, **overrides):
  return tiny_config(data_dir, **overrides)


def test_nonfinite_loss_stops_with_the_step_and_keeps_the_checkpoint(tmp_path, data_dir):
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(_config(data_dir, num_epochs=1), workdir)  # A good checkpoint.
  # An image scale of 1e-45 makes every pixel inf: step 21, the first of epoch 2, blows up.
  config = _config(data_dir, num_epochs=2, **{'input.std': (1e-45,)})
  with pytest.raises(FloatingPointError, match=r'Non-finite loss or gradient at step 21 .*; '
                     r'stopped. The last good checkpoint \(step 20\) is kept in '):
    train.train_and_evaluate(config, workdir)
  ckpt = checkpoint.Checkpointer(workdir, keep=2)
  assert ckpt.latest_step() == 20
  ckpt.close()


def test_nonfinite_steps_can_be_skipped(tmp_path, data_dir):
  workdir = str(tmp_path / 'run')
  config = _config(data_dir, num_epochs=1, on_nonfinite='skip', **{'input.std': (1e-45,)})
  train.train_and_evaluate(config, workdir)
  rows = reporting.read_metrics(os.path.join(workdir, 'metrics.jsonl'))
  assert sum(r.get('train_skipped_steps', 0) for r in rows) == 20
  _, state = _final_state(workdir)
  assert all(np.isfinite(a).all() for a in _flatten(state['params']).values())


@pytest.mark.resume
def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, data_dir, caplog):
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(_config(data_dir, num_epochs=2), workdir)
  before = metrics_text(workdir)
  state_dir = os.path.join(workdir, 'checkpoints', 'latest', '40', 'state')
  for root, _, files in os.walk(state_dir):
    for name in files:
      if name not in ('_METADATA', '_CHECKPOINT_METADATA', 'commit_success.txt'):
        with open(os.path.join(root, name), 'r+b') as f:
          f.truncate(3)  # A truncated write.
  # Resuming a 3-epoch run picks up at step 20 and keeps the corrupt step 40 on disk.
  with caplog.at_level(logging.INFO, logger='absl'):
    train.train_and_evaluate(_config(data_dir, num_epochs=3), workdir)
  assert_resumed(caplog.text, before, metrics_text(workdir), 20)
  assert re.search(r'Checkpoint \S+/latest/40 does not restore', caplog.text)
  assert os.path.exists(state_dir)
  steps = [s for s, _ in _losses(workdir)]
  assert steps == sorted(set(steps)) and steps[-1] == 60


def test_unreadable_checkpoints_are_never_trained_over(tmp_path, data_dir):
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(_config(data_dir, num_epochs=1), workdir)
  shutil.rmtree(os.path.join(workdir, 'checkpoints', 'latest', '20', 'state'))
  with pytest.raises(RuntimeError, match=r'None of the checkpoints \[20\] in .* restores'):
    train.train_and_evaluate(_config(data_dir, num_epochs=2), workdir)


def test_unwritable_workdir_fails_before_any_work(data_dir):
  with pytest.raises(OSError, match=r'workdir /proc/vgg_flax_run is not writable'):
    train.train_and_evaluate(_config(data_dir), '/proc/vgg_flax_run')


def test_full_disk_fails_before_training(tmp_path, data_dir, monkeypatch):
  workdir = str(tmp_path / 'run')
  usage = shutil.disk_usage(tmp_path)
  monkeypatch.setattr(storage.shutil, 'disk_usage', lambda _: usage._replace(free=1 << 20))
  with pytest.raises(OSError, match=r'has 1 MiB free; 3 checkpoints of this model need \d+ MiB'):
    train.train_and_evaluate(_config(data_dir), workdir)
  assert not os.path.exists(os.path.join(workdir, 'metrics.jsonl'))


def _saved_steps(workdir):
  """Complete checkpoint steps and leftover temporary folders, under latest/ and best/."""
  steps, tmp = {}, []
  for kind in ('latest', 'best'):
    path = os.path.join(workdir, 'checkpoints', kind)
    names = os.listdir(path) if os.path.isdir(path) else []
    steps[kind] = sorted(int(d) for d in names if d.isdigit())
    tmp += [d for d in names if 'tmp' in d]
  return steps, tmp


@pytest.mark.parametrize('on_nonfinite', ['stop', 'skip'])
def test_a_diverged_run_is_never_checkpointed_nor_finished(tmp_path, data_dir, on_nonfinite):
  # Regression: with checks only at log steps, the every_steps save at step 5
  # wrote non-finite parameters, the error skipped ckpt.wait() (step 10 left
  # as a temporary folder), and 'skip' wrote result.json with eval_loss=nan.
  workdir = str(tmp_path / 'run')
  config = _config(data_dir, num_epochs=1, optimizer='sgd', learning_rate=1e8,
                   on_nonfinite=on_nonfinite, log_every_steps=10,
                   **{'checkpoint.every_steps': 5})
  with pytest.raises(FloatingPointError, match=r'(Non-finite loss or gradient at step \d+|'
                     r'The train state at step \d+ is not finite; not saved|'
                     r'Evaluation at step \d+ is not finite .*; not saved, no result)'):
    train.train_and_evaluate(config, workdir)
  steps, tmp = _saved_steps(workdir)
  assert tmp == []
  for step in steps['latest']:
    with ocp.StandardCheckpointer() as ckptr:
      state = ckptr.restore(os.path.join(workdir, 'checkpoints', 'latest', str(step), 'state'))
    assert all(np.isfinite(a).all() for a in _flatten(state['params']).values()), step
  assert not os.path.exists(os.path.join(workdir, 'result.json'))


def test_storage_errors_are_not_mistaken_for_corrupt_checkpoints():
  # A storage that cannot be read must stop the run; only bad bytes fall back.
  transient = [ConnectionRefusedError(111, 'Connection refused'), TimeoutError('read timed out'),
               PermissionError(13, 'Permission denied'), OSError(5, 'Input/output error'),
               ValueError('UNAVAILABLE: Error reading "x" in OCDBT database'),
               ValueError('DEADLINE_EXCEEDED: Error reading "x"')]
  corrupt = [ValueError('OUT_OF_RANGE: Error reading "step/.zarray" in OCDBT database'),
             ValueError('NOT_FOUND: Error opening "zarr" driver'), FileNotFoundError(2, 'gone'),
             json.JSONDecodeError('Unterminated string', '{"tr', 1)]
  assert [checkpoint.is_storage_error(e) for e in transient] == [True] * len(transient)
  assert [checkpoint.is_storage_error(e) for e in corrupt] == [False] * len(corrupt)


def test_a_second_trainer_on_a_workdir_in_use_is_refused_at_launch(tmp_path, data_dir):
  # Regression: two trainers on one workdir both ran to the end and wrote
  # every metrics row twice.
  workdir = str(tmp_path / 'run')
  long_run = _command(workdir, data_dir, '--config.num_epochs=50', '--config.log_every_steps=2')
  # The real interpreter: the lease must name this PID (a warm command's is the fork's).
  first = subprocess.Popen([sys.executable] + long_run[1:], cwd=ROOT, env=_env(1),
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + 150
    while time.time() < deadline and not (
        os.path.exists(os.path.join(workdir, 'metrics.jsonl')) and _losses(workdir)):
      assert first.poll() is None, first.stderr.read()[-3000:]
      time.sleep(0.2)
    second = subprocess.run(long_run, cwd=ROOT, env=_env(1), capture_output=True, text=True,
                            timeout=120)
    assert second.returncode != 0
    assert re.search(rf'workdir {re.escape(workdir)} is in use by host {socket.gethostname()}, '
                     rf'PID {first.pid} \(last refresh \d+ s ago\)', second.stderr), \
        second.stderr[-3000:]
    assert 'First step' not in second.stderr  # Refused before compiling anything.
    assert first.poll() is None  # The first one trains on...
    first.send_signal(signal.SIGTERM)  # ...until it is preempted.
    _, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr[-3000:]
  finally:
    if first.poll() is None:
      os.kill(first.pid, signal.SIGKILL)
  steps = [s for s, _ in _losses(workdir)]
  assert steps == sorted(set(steps)) and steps  # One row per logged step.
