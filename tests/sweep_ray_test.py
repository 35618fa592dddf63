"""Issues 14, 20 and 25: `python -m vgg_flax.sweep --launcher=ray` on a real local Ray cluster.

The cluster is `ray start --head` on 127.0.0.1 with 2 CPUs, started by the
fixture in a folder of its own (as with --ray_address=auto, tasks do not run
in the sweep's folder) and stopped by its PID; its nodes see the session's
GCS-API server, as a real cluster's nodes see their bucket. One sweep of 3
tiny runs (1 CPU each: two at once, the third queued) goes through the CLI
with a relative --workdir; one run's first attempt is SIGKILLed after its
first checkpoint: it is retried, resumes from that checkpoint, and ends with
the results of the same run trained in one go by the command the local
launcher runs, digit for digit (on the CPU the runs are deterministic).
"""

import contextlib
import csv
import datetime
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import psutil
import pytest

from vgg_flax.io import storage
from vgg_flax.io import workdirs
from vgg_flax import sweep

from helpers import ROOT, python

ray = pytest.importorskip('ray')
TESTS = os.path.dirname(os.path.abspath(__file__))
# Columns of results.csv the test reads (not speed or path).
SAME = ('depth', 'seed', 'step', 'eval_accuracy', 'eval_top5_accuracy', 'eval_loss',
        'best_eval_accuracy', 'num_params')
STEPS = 12  # Per run: 384 images in batches of 32, a checkpoint every 2 steps.


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _short_temp():
  """A new folder directly under /tmp (see `_ray_head`)."""
  return tempfile.mkdtemp(prefix='ray', dir='/tmp')


def _start_head(temp, num_cpus, env, log):
  """(process, port) of `ray start --head`, once its GCS answers; None if it exited first."""
  port = _free_port()
  ray_bin = os.path.join(os.path.dirname(sys.executable), 'ray')
  head = subprocess.Popen(
      [ray_bin, 'start', '--head', '--block', f'--port={port}', f'--num-cpus={num_cpus}',
       '--num-gpus=0', '--include-dashboard=false', f'--temp-dir={temp}',
       '--disable-usage-stats'], cwd=temp, env={**os.environ, **(env or {})},
      stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
  deadline = time.time() + 120
  while head.poll() is None:
    assert time.time() < deadline, 'ray start --head did not come up in 120 s'
    with socket.socket() as s:
      if s.connect_ex(('127.0.0.1', port)) == 0:
        return head, port
    time.sleep(0.5)
  return None, port


@contextlib.contextmanager
def _ray_head(temp, num_cpus: int, env=None):
  """host:port of a Ray head started in `temp` with `num_cpus` CPUs and `env` added.

  `temp` must be short: Ray's sockets live below it, and a Unix socket path has
  at most 107 bytes (pytest's own temporary folders under xdist can be longer).
  It is removed at the end.
  """
  log = open(os.path.join(temp, 'ray_start.log'), 'w')  # pylint: disable=consider-using-with
  # A second head beside the module's cluster once exited while starting, inside a
  # loaded suite run (its output was not kept then): up to three tries, then its log.
  for _ in range(3):
    head, port = _start_head(temp, num_cpus, env, log)
    if head is not None:
      break
  else:
    raise AssertionError('ray start --head exited three times:\n'
                         + open(log.name, errors='replace').read()[-3000:])
  try:
    # Ray connects to the machine's address for 127.0.0.1; the head listens on both.
    yield f'127.0.0.1:{port}'
  finally:
    # The node is private to the test and holds nothing: no graceful stop (which
    # took 33 s), but SIGKILL for its processes: the head's descendants, and any
    # that left them but name the node's folder.
    node = [p for p in psutil.process_iter(['cmdline'])
            if str(temp) in ' '.join(p.info['cmdline'] or [])]
    with contextlib.suppress(psutil.NoSuchProcess):  # A head that died at start has none.
      node += psutil.Process(head.pid).children(recursive=True)
    with contextlib.suppress(ProcessLookupError):
      os.killpg(head.pid, signal.SIGKILL)
    for proc in node:
      with contextlib.suppress(psutil.NoSuchProcess):
        proc.kill()
    head.wait(timeout=30)
    psutil.wait_procs(node, timeout=30)
    log.close()
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope='module')
def ray_cluster(gcs_server):  # pylint: disable=unused-argument
  """host:port of a Ray head on this machine with 2 CPUs; stopped at the end."""
  # Token authentication (on by default for `ray start`) would read and write
  # ~/.ray/auth_token: off, for a cluster private to the test.
  os.environ['RAY_AUTH_MODE'] = 'disabled'  # Also for the sweeps this module starts.
  try:
    with _ray_head(_short_temp(), num_cpus=2) as address:
      yield address
  finally:
    os.environ.pop('RAY_AUTH_MODE', None)


@pytest.fixture(scope='module')
def data_dir(digits):
  """Built already: trainers started side by side would all build them."""
  return pathlib.Path(digits)


def _sweep_file(tmp_path, data_dir, seeds=(0, 1, 2)) -> str:
  """Runs of STEPS steps (depth 11, `seeds`), a checkpoint every 2; data_dir as given."""
  path = tmp_path / 'tiny_sweep.py'
  path.write_text(
      'import sys\n'
      f'sys.path.insert(0, {TESTS!r})\n'
      'import ml_collections\n'
      'from vgg_flax import sweep\n\n'
      'def get_config():\n'
      '  c = ml_collections.ConfigDict()\n'
      "  c.title = 'tiny'\n"
      f"  c.base = {str(tmp_path / 'tiny.py')!r}\n"
      "  c.fixed = (('model.fc_dim', 16), ('checkpoint.every_steps', 2))\n"
      "  c.axes = (sweep.axis('depth', 'model.depth', (11,)),)\n"
      f'  c.seeds = {tuple(seeds)!r}\n'
      '  return c\n')
  (tmp_path / 'tiny.py').write_text(
      'import sys\n'
      f'sys.path.insert(0, {TESTS!r})\n'
      'from helpers import tiny_config\n\n'
      'def get_config():\n'
      f'  return tiny_config({str(data_dir)!r}, num_epochs=1, log_every_steps=1,\n'
      f"                     train_split='train[:{32 * STEPS}]')\n")
  return str(path)


def _sweep_cli(sweep_file, workdir, *flags, cwd=ROOT):
  return subprocess.Popen([sys.executable, '-m', 'vgg_flax.sweep', f'--config={sweep_file}',
                           f'--workdir={workdir}', *flags], cwd=cwd, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _interrupt(workdir, signum, sweep_proc, deadline) -> psutil.Process:
  """Sends `signum` to the first trainer of `workdir` once its first checkpoint
  (step 2) exists: an interrupt after a checkpoint, before the end."""
  trainer, first = None, f'{workdir}/checkpoints/latest/2'
  while time.time() < deadline and sweep_proc.poll() is None:
    if trainer is None:
      trainer = next((p for p in psutil.process_iter(['cmdline'])
                      if f'--workdir={workdir}' in (p.info['cmdline'] or [])), None)
    elif storage.exists(first):
      trainer.send_signal(signum)
      return trainer
    time.sleep(0.02 if trainer else 0.2)  # Once started, it trains in about 2 s.
  raise AssertionError(f'{workdir} never saved step 2: ' + (
      sweep_proc.stdout.read()[-3000:] if sweep_proc.poll() is not None else ''))


def _attempts(workdir) -> list[str]:
  """The run's train.log, one text per attempt."""
  log = storage.read_text(f'{workdir}/{workdirs.LOG_FILE}')
  return log.split(sweep.ATTEMPT_MARK.decode())[1:]


def _steps(attempt: str) -> list[int]:
  """The steps an attempt trained (a progress line per step)."""
  return [int(s) for s in re.findall(rf'\] step (\d+)/{STEPS} ', attempt)]


def _resumed_step(attempts: list[str]) -> int:
  """The step the second attempt resumed from, after checking it trained no step
  before it again and that the first attempt stopped strictly before the end."""
  assert len(attempts) == 2, attempts
  resumed = re.findall(r'Resumed from step (\d+) of ', attempts[1])
  assert len(resumed) == 1, attempts[1]  # Not started again from scratch.
  step = int(resumed[0])
  assert 2 <= step < STEPS and max(_steps(attempts[0]), default=0) >= step, attempts
  assert _steps(attempts[1]) == list(range(step + 1, STEPS + 1)), attempts[1]
  return step


def _spans(attempts):
  """(first, last) wall-clock times of each attempt of the run, from its absl log lines."""
  spans = []
  for attempt in attempts:
    stamps = re.findall(r'^I\d{4} (\d\d:\d\d:\d\d\.\d+)', attempt, re.M)
    times = [datetime.datetime.strptime(s, '%H:%M:%S.%f').timestamp() for s in stamps]
    spans += [(times[0], times[-1])] if times else []
  return spans


def _rows_to(metrics: str, step: int) -> list[str]:
  return [row for row in metrics.splitlines() if json.loads(row)['step'] <= step]


def _result(workdir):
  """result.json's numbers (not its wall-clock fields)."""
  result = storage.read_json(f'{workdir}/result.json')
  return {k: result[k] for k in ('step', 'eval', 'best', 'num_params')}


def _rows(report_dir):
  text = storage.read_text(f'{report_dir}/{sweep.CSV_FILE}')
  return [{k: row[k] for k in SAME} for row in csv.DictReader(text.splitlines())]


@pytest.mark.resume
def test_ray_runs_side_by_side_retries_resumes_and_reports_as_local(ray_cluster, tmp_path,
                                                                    data_dir):
  # Relative paths, run in tmp_path: --workdir and the base file's data_dir.
  sweep_file = _sweep_file(tmp_path, os.path.relpath(data_dir, tmp_path))
  # The reference: the run Ray will SIGKILL, trained in one go (alongside the
  # sweep) by the command the local launcher runs for it (--print_commands
  # prints it).
  config = sweep.load_config_file(sweep_file)
  [command] = [run.command(config.base) for run in sweep.plan(config, 'local') if run.seed == 1]
  reference = subprocess.Popen([python()] + command[1:], cwd=tmp_path, text=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  ray_dir = str(tmp_path / 'ray')
  proc = _sweep_cli(sweep_file, 'ray', '--launcher=ray', f'--ray_address={ray_cluster}',
                    '--cpus_per_run=1', '--retries=1', cwd=tmp_path)
  try:
    killed = os.path.join(ray_dir, 'depth=11', 'seed1')
    trainer = _interrupt(killed, signal.SIGKILL, proc, time.time() + 240)  # A lost node.
    trainer.wait(timeout=30)
    metrics_at_kill = open(os.path.join(killed, 'metrics.jsonl')).read()
    out, _ = proc.communicate(timeout=400)
    assert reference.wait(timeout=300) == 0, reference.stderr.read()[-3000:]
  finally:
    for p in (proc, reference):
      if p.poll() is None:
        p.kill()
  assert proc.returncode == 0, out[-4000:]
  assert '3 runs scheduled on Ray (1 CPU, 0 GPU each; cluster: 2 CPU, 0 GPU)' in out, out
  assert ('[2/3] depth=11 seed 1: attempt 1 FAILED: exit -9; see ray/depth=11/seed1/train.log; '
          'retrying (attempt 2 of 2).') in out, out
  runs = {w: _attempts(os.path.join(ray_dir, 'depth=11', w)) for w in ('seed0', 'seed1', 'seed2')}
  assert {w: len(a) for w, a in runs.items()} == {'seed0': 1, 'seed1': 2, 'seed2': 1}, out
  # The retry resumed from the last checkpoint the killed attempt left and
  # trained only the steps after it; the metrics rows up to it are as they were.
  resumed = _resumed_step(runs['seed1'])
  metrics = open(os.path.join(killed, 'metrics.jsonl')).read()
  assert _rows_to(metrics, resumed) == _rows_to(metrics_at_kill, resumed)
  assert [json.loads(r)['step'] for r in metrics.splitlines() if 'train_loss' in r] == list(
      range(1, STEPS + 1))
  # 2 CPUs, 1 per run: attempts of different runs overlap in time, never more
  # than 2 at once (the killed attempt held its CPU too).
  spans_of = [_spans(a) for a in runs.values()]
  spans = [span for run in spans_of for span in run]
  overlapping = [(a, b) for i, run in enumerate(spans_of) for a in run
                 for other in spans_of[i + 1:] for b in other if a[0] < b[1] and b[0] < a[1]]
  assert overlapping, spans_of
  assert max(sum(s[0] <= t < s[1] for s in spans) for t, _ in spans) <= 2, spans
  # The relative paths were the driver's: the trainers got them absolute.
  assert {storage.read_json(os.path.join(ray_dir, 'depth=11', w, 'config.json'))['data_dir']
          for w in runs} == {str(data_dir)}
  # The resumed run ends where the run trained in one go does, to the last digit.
  assert _result(killed) == _result(os.path.join(tmp_path, 'local', 'depth=11', 'seed1'))
  rows = _rows(ray_dir)
  assert [(r['depth'], r['seed'], r['step']) for r in rows] == [
      ('11', str(seed), str(STEPS)) for seed in (0, 1, 2)]
  assert rows[1]['eval_accuracy'] == repr(_result(killed)['eval']['eval_accuracy'])
  assert sorted(os.listdir(ray_dir)) == ['depth=11', 'results.csv', 'results.md', 'results.png']

  # Run again: every run finished, nothing scheduled, Ray not even joined.
  from vgg_flax.sweeps import sweep_ray  # pylint: disable=g-import-not-at-top
  lines = []
  again = sweep.plan(sweep.load_config_file(sweep_file), ray_dir)
  assert sweep_ray.run_all(again, sweep.load_config_file(sweep_file).base,
                           address=ray_cluster, log=lines.append) == []
  assert lines == [f'[{i}/3] depth=11 seed {i - 1}: finished earlier, skipped.'
                   for i in (1, 2, 3)]
  assert not ray.is_initialized()


def test_a_ray_sweep_on_a_bucket_trains_and_reports_a_stopped_run(ray_cluster, gcs_bucket,
                                                                   tmp_path, data_dir):
  # Issue 20, item 1: buckets have no folders, yet the tasks must find the sweep's;
  # item 3: a trainer stopped by SIGTERM saves and exits 0, unfinished: a failure.
  import gcs  # pylint: disable=g-import-not-at-top  # tests/gcs.py
  sweep_file = _sweep_file(tmp_path, data_dir, seeds=(0, 1))
  root = f'{gcs_bucket}/tiny'
  proc = _sweep_cli(sweep_file, root, '--launcher=ray', f'--ray_address={ray_cluster}',
                    '--retries=0')
  stopped = f'{root}/depth=11/seed1'
  try:
    _interrupt(stopped, signal.SIGTERM, proc, time.time() + 240)
    out, _ = proc.communicate(timeout=400)
  finally:
    if proc.poll() is None:
      proc.kill()
  # With no retry left, a run stopped unfinished is reported and the sweep fails.
  assert proc.returncode == 1, out[-4000:]
  assert (f'[2/2] depth=11 seed 1: FAILED: exit 0 before the run finished; see '
          f'{stopped}/{workdirs.LOG_FILE}. ') in out, out
  assert out.endswith(f'1 runs failed: {stopped}\n'), out[-2000:]
  assert 'Stopped by SIGTERM: saved step' in _attempts(stopped)[0]
  # The other trained to the end in the bucket, and is the report's only row.
  assert _result(f'{root}/depth=11/seed0')['step'] == STEPS
  assert [(r['seed'], r['step']) for r in _rows(root)] == [('0', str(STEPS))]
  assert storage.listdir(root) == ['depth=11', 'results.csv', 'results.md', 'results.png']
  assert gcs.local_leftovers(ROOT) == [] and gcs.local_leftovers(str(tmp_path)) == []


def test_a_run_that_ray_kills_is_reported_not_a_crash(tmp_path, data_dir):
  # Issue 20, suspected: Ray's own errors (here its memory monitor's, on a node
  # whose threshold every process exceeds) are the run's failure, not the driver's.
  from vgg_flax.sweeps import sweep_ray  # pylint: disable=g-import-not-at-top
  sweep_file = _sweep_file(tmp_path, data_dir, seeds=(0,))
  root = str(tmp_path / 'sweep')
  runs = sweep.plan(sweep.load_config_file(sweep_file), root)
  lines = []
  os.environ['RAY_AUTH_MODE'] = 'disabled'
  try:
    with _ray_head(_short_temp(), num_cpus=1,
                   env={'RAY_memory_usage_threshold': '0.01'}) as address:
      [outcome] = sweep_ray.run_all(runs, str(tmp_path / 'tiny.py'), address=address, retries=0,
                                    log=lines.append)
  finally:
    os.environ.pop('RAY_AUTH_MODE', None)
    for p in psutil.process_iter(['cmdline']):  # A trainer its killed task may have started.
      if f'--workdir={runs[0].workdir}' in (p.info['cmdline'] or []):
        p.kill()
  error = 'OutOfMemoryError: 1 worker(s) were killed due to the node running low on memory.'
  assert not outcome.ok and outcome.error.startswith(error), outcome
  assert lines[-1].startswith(f'[1/1] depth=11 seed 0: FAILED: {error}'), lines
  assert not ray.is_initialized() and os.listdir(root) == ['depth=11']  # No marker left.


def test_a_worker_that_cannot_see_the_sweep_folder_says_so(tmp_path):
  from vgg_flax.sweeps import sweep_ray  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / 'elsewhere' / 'depth=11' / 'seed0'
  workdir.mkdir(parents=True)  # A folder proves nothing (buckets have none): the marker does.
  marker = str(tmp_path / 'elsewhere' / f'{sweep_ray.MARKER}0123abcd')
  with pytest.raises(sweep_ray.WorkdirNotShared,
                     match=r'cannot see the run workdir .*elsewhere/depth=11/seed0 \(no '
                           r'\.ray_sweep-0123abcd in its sweep folder\): a Ray sweep needs its '
                           r'--workdir on storage every node sees \(a shared disk, or gs://\)\.$'):
    sweep_ray.check_visible(str(workdir), marker)
  storage.write_text(marker, 'x')
  sweep_ray.check_visible(str(workdir), marker)
