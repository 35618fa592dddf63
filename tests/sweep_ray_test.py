"""Issue 14: `python -m vgg_flax.sweep --launcher=ray` on a real local Ray cluster.

The cluster is `ray start --head` on 127.0.0.1 with 2 CPUs, started by the
fixture and stopped by its PID. One sweep of 3 tiny runs (1 CPU each: two at
once, the third queued) goes through the CLI with one run's first attempt
killed; that run must end with the results of the same run trained in one go
by the command the local launcher runs, digit for digit (on the CPU the runs
are deterministic, and a retried run resumes exactly).
"""

import csv
import datetime
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

from vgg_flax import sweep

from helpers import ROOT

pytest.importorskip('ray')
TESTS = os.path.dirname(os.path.abspath(__file__))
# Columns of results.csv the test reads (not speed or path).
SAME = ('depth', 'seed', 'step', 'eval_accuracy', 'eval_top5_accuracy', 'eval_loss',
        'best_eval_accuracy', 'num_params')


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.fixture(scope='module')
def ray_cluster(tmp_path_factory):
  """host:port of a Ray head on this machine with 2 CPUs; stopped at the end."""
  port = _free_port()
  temp = tmp_path_factory.mktemp('ray')
  ray_bin = os.path.join(os.path.dirname(sys.executable), 'ray')
  # Token authentication (on by default for `ray start`) would read and write
  # ~/.ray/auth_token: off, for a cluster private to the test.
  os.environ['RAY_AUTH_MODE'] = 'disabled'  # Also for the sweeps this module starts.
  head = subprocess.Popen(
      [ray_bin, 'start', '--head', '--block', f'--port={port}', '--num-cpus=2', '--num-gpus=0',
       '--include-dashboard=false', f'--temp-dir={temp}', '--disable-usage-stats'],
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
  # Ray connects to the machine's address for 127.0.0.1; the head listens on both.
  address = f'127.0.0.1:{port}'
  try:
    deadline = time.time() + 120
    while True:  # Up when its GCS answers on the port.
      assert head.poll() is None and time.time() < deadline, 'ray start --head did not come up'
      with socket.socket() as s:
        if s.connect_ex(('127.0.0.1', port)) == 0:
          break
      time.sleep(0.5)
    yield address
  finally:
    # The node is private to the test and holds nothing: no graceful stop (which
    # took 33 s), but SIGKILL for its processes: the head's descendants, and any
    # that left them but name the node's folder.
    node = psutil.Process(head.pid).children(recursive=True) + [
        p for p in psutil.process_iter(['cmdline'])
        if str(temp) in ' '.join(p.info['cmdline'] or [])]
    os.killpg(head.pid, signal.SIGKILL)
    for proc in node:
      try:
        proc.kill()
      except psutil.NoSuchProcess:
        pass
    head.wait(timeout=30)
    psutil.wait_procs(node, timeout=30)
    os.environ.pop('RAY_AUTH_MODE', None)


def _sweep_file(tmp_path, data_dir) -> str:
  """3 runs (depth 11, seeds 0, 1, 2) of 6 steps, a checkpoint every 2."""
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
      '  c.seeds = (0, 1, 2)\n'
      '  return c\n')
  (tmp_path / 'tiny.py').write_text(
      'import sys\n'
      f'sys.path.insert(0, {TESTS!r})\n'
      'from helpers import tiny_config\n\n'
      'def get_config():\n'
      f'  return tiny_config({str(data_dir)!r}, num_epochs=1, log_every_steps=1,\n'
      "                     train_split='train[:192]')\n")
  return str(path)


def _sweep_cli(sweep_file, workdir, *flags):
  return subprocess.Popen([sys.executable, '-m', 'vgg_flax.sweep', f'--config={sweep_file}',
                           f'--workdir={workdir}', *flags], cwd=ROOT, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _kill_first_attempt(workdir, deadline, sweep_proc):
  """SIGKILLs the trainer of `workdir` once it has logged its first step (a lost node)."""
  log = os.path.join(workdir, sweep.LOG_FILE)
  while time.time() < deadline and sweep_proc.poll() is None:
    if os.path.exists(log) and 'First step' in open(log).read():
      for proc in psutil.process_iter(['cmdline']):
        if f'--workdir={workdir}' in (proc.info['cmdline'] or []):
          proc.kill()
          return
    time.sleep(0.1)
  raise AssertionError(f'{workdir} never started: ' + (sweep_proc.stdout.read()[-3000:]
                                                       if sweep_proc.poll() is not None else ''))


def _spans(workdir):
  """(first, last) wall-clock times of each attempt of the run, from its absl log lines."""
  text = open(os.path.join(workdir, sweep.LOG_FILE)).read()
  spans = []
  for attempt in text.split(sweep.ATTEMPT_MARK.decode())[1:]:
    stamps = re.findall(r'^I\d{4} (\d\d:\d\d:\d\d\.\d+)', attempt, re.M)
    times = [datetime.datetime.strptime(s, '%H:%M:%S.%f').timestamp() for s in stamps]
    spans += [(times[0], times[-1])] if times else []
  return spans


def _result(workdir):
  """result.json's numbers (not its wall-clock fields)."""
  with open(os.path.join(workdir, 'result.json')) as f:
    result = json.load(f)
  return {k: result[k] for k in ('step', 'eval', 'best', 'num_params')}


def _rows(report_dir):
  with open(os.path.join(report_dir, sweep.CSV_FILE)) as f:
    return [{k: row[k] for k in SAME} for row in csv.DictReader(f)]


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp('data')


def test_ray_runs_side_by_side_retries_skips_and_reports_as_local(ray_cluster, tmp_path,
                                                                  data_dir):
  sweep_file = _sweep_file(tmp_path, data_dir)
  # The reference: the run Ray will retry, trained in one go by the command the
  # local launcher runs for it (--print_commands prints it).
  local = str(tmp_path / 'local')
  printed = subprocess.run([sys.executable, '-m', 'vgg_flax.sweep', f'--config={sweep_file}',
                            f'--workdir={local}', '--print_commands'], cwd=ROOT,
                           capture_output=True, text=True, timeout=120, check=True).stdout
  command = shlex.split(next(line for line in printed.splitlines() if 'seed1' in line))
  done = subprocess.run([sys.executable] + command[1:], cwd=ROOT, capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]

  ray_dir = str(tmp_path / 'ray')
  proc = _sweep_cli(sweep_file, ray_dir, '--launcher=ray', f'--ray_address={ray_cluster}',
                    '--cpus_per_run=1', '--retries=1')
  try:
    victim = os.path.join(ray_dir, 'depth=11', 'seed1')
    _kill_first_attempt(victim, time.time() + 240, proc)
    out, _ = proc.communicate(timeout=400)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 0, out[-4000:]
  assert '3 runs scheduled on Ray (1 CPU, 0 GPU each; cluster: 2 CPU, 0 GPU)' in out, out
  attempts = {w: open(os.path.join(ray_dir, w, sweep.LOG_FILE)).read().count(
      sweep.ATTEMPT_MARK.decode()) for w in ('depth=11/seed0', 'depth=11/seed1',
                                             'depth=11/seed2')}
  assert attempts == {'depth=11/seed0': 1, 'depth=11/seed1': 2, 'depth=11/seed2': 1}
  # 2 CPUs, 1 per run: attempts of different runs overlap in time, never more
  # than 2 at once (the killed attempt held its CPU too).
  runs = [_spans(os.path.join(ray_dir, w)) for w in attempts]
  spans = [span for run in runs for span in run]
  overlapping = [(a, b) for i, run in enumerate(runs) for a in run for other in runs[i + 1:]
                 for b in other if a[0] < b[1] and b[0] < a[1]]
  assert overlapping, runs
  assert max(sum(s[0] <= t < s[1] for s in spans) for t, _ in spans) <= 2, spans
  # The retried run ends where the run trained in one go does, to the last digit.
  assert _result(os.path.join(ray_dir, 'depth=11', 'seed1')) == _result(
      os.path.join(local, 'depth=11', 'seed1'))
  rows = _rows(ray_dir)
  assert [(r['depth'], r['seed'], r['step']) for r in rows] == [
      ('11', str(seed), '6') for seed in (0, 1, 2)]
  assert rows[1]['eval_accuracy'] == repr(_result(os.path.join(ray_dir, 'depth=11', 'seed1'))[
      'eval']['eval_accuracy'])

  again = subprocess.run([sys.executable, '-m', 'vgg_flax.sweep', f'--config={sweep_file}',
                          f'--workdir={ray_dir}', '--launcher=ray',
                          f'--ray_address={ray_cluster}'],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert again.returncode == 0, again.stdout[-3000:]
  assert again.stdout.count('finished earlier, skipped.') == 3
  assert 'scheduled on Ray' not in again.stdout  # Nothing scheduled; Ray not even joined.


def test_a_worker_that_cannot_see_the_workdir_says_so(tmp_path):
  from vgg_flax import sweep_ray  # pylint: disable=g-import-not-at-top
  missing = str(tmp_path / 'elsewhere' / 'depth=11' / 'seed0')
  with pytest.raises(sweep_ray.WorkdirNotShared,
                     match=r'cannot see the run workdir .*elsewhere/depth=11/seed0: a Ray sweep '
                           r'needs its --workdir on storage every node sees \(a shared disk, '
                           r'or gs://\)\.'):
    sweep_ray.check_visible(missing)
