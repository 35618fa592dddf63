"""A sweep's runs on a Ray cluster: `python -m vgg_flax.sweep ... --launcher=ray`.

Every run is the same `python -m vgg_flax.train` command as with the local
launcher (`--print_commands` prints it; local paths made absolute, below),
executed as a subprocess inside a Ray task that asks for the run's CPUs and
GPUs: Ray places it where they are free, runs as many side by side as the
cluster holds, and gives a GPU task only its own GPUs (CUDA_VISIBLE_DEVICES).

An attempt fails, as with the local launcher, when its trainer exits non-zero
or exits 0 unfinished (a trainer stopped by SIGTERM saves and exits 0), and
also when Ray loses its task (the node died or ran low on memory, the worker
crashed). The driver judges each attempt and schedules the next, `retries`
times, each resuming from the run's checkpoint; a run that keeps failing is
reported by name and the others go on. Ctrl-C or SIGTERM on the sweep, or any
error of the driver, cancels the tasks: each passes SIGTERM to its trainer,
which saves a checkpoint, and the same command later continues.

Where Ray runs: `ray_address=''` starts a Ray instance on this machine for
the sweep; 'auto' or 'host:port' joins a running cluster (`ray start --head`
on one node, `ray start --address=...` on the others; inside a SLURM
allocation, or KubeRay). Every node needs vgg_flax installed, the base config
file at the same path, and the sweep's --workdir on storage all nodes see
(a shared disk, or gs://). Tasks do not run in the driver's folder: the
driver makes the command's local paths absolute (the base config, the run's
workdir, config.data_dir and config.init_from). It also writes a marker file,
named for this sweep, into the sweep's folder: a task that cannot read it (a
worker's own disk, another bucket) fails with that message, not retried,
instead of training into a folder the sweep never sees. (Buckets have no
folders: a file, not a folder, proves the storage is the driver's.)

Ray is the optional extra `vgg_flax[ray]`; nothing else imports this module.
A task imports it and vgg_flax.sweep, both light: the trainer, not the task,
loads JAX.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import signal
import socket
import time
from typing import Any, Callable
import uuid

from vgg_flax.io import storage
from vgg_flax.io import workdirs
from vgg_flax.sweeps import grid as sweep_lib

# The sweep's marker file, in its folder while the driver runs: MARKER + a token.
MARKER = '.ray_sweep-'
# Config fields holding paths: the driver makes relative ones absolute.
PATH_FIELDS = ('data_dir', 'init_from')


class WorkdirNotShared(RuntimeError):
  """A worker cannot see the run's workdir: retrying elsewhere would not help."""


@dataclasses.dataclass
class Outcome:
  """What became of one run's task."""
  run: sweep_lib.Run
  ok: bool
  error: str = ''
  start: float = 0.0  # Wall-clock seconds of the last attempt, on its node.
  end: float = 0.0
  node: str = ''


def check_visible(workdir: str, marker: str) -> None:
  """Raises WorkdirNotShared unless this process sees `marker`, which the
  driver wrote into the sweep's folder (on its storage) for this sweep only."""
  if not storage.exists(marker):
    raise WorkdirNotShared(
        f'a worker on {socket.gethostname()} cannot see the run workdir {workdir} (no '
        f'{os.path.basename(marker)} in its sweep folder): a Ray sweep needs its --workdir on '
        'storage every node sees (a shared disk, or gs://).')


def train_run(run: sweep_lib.Run, base: str, marker: str) -> dict[str, Any]:
  """The body of a run's Ray task: one attempt at the training command.

  Returns:
    {'code': the trainer's exit status, 'start', 'end': wall-clock seconds,
    'node': this host}; the driver judges whether the run finished.
  """
  check_visible(run.workdir, marker)
  start = time.time()
  code = sweep_lib.launch(run, base)
  return {'code': code, 'start': start, 'end': time.time(), 'node': socket.gethostname()}


def _absolute(base: str) -> str:
  """The base config as an absolute path: tasks do not run in the driver's folder."""
  path, sep, arg = base.partition(':')
  return os.path.abspath(path) + sep + arg if os.path.exists(path) else base


def _is_relative(path: Any) -> bool:
  return (isinstance(path, str) and path != '' and not storage.is_remote(path)
          and not os.path.isabs(path) and not path.startswith('~'))


def for_workers(run: sweep_lib.Run) -> sweep_lib.Run:
  """`run` with its local paths absolute, as the driver means them: its
  workdir, its sweep folder and the config's PATH_FIELDS (from the sweep or
  the base file; they are bookkeeping, so the run's result still counts)."""
  task_run = copy.copy(run)
  task_run.root, task_run.workdir = (os.path.abspath(p) if _is_relative(p) else p
                                     for p in (run.root, run.workdir))
  task_run.overrides = dict(run.overrides)
  for field in PATH_FIELDS:
    value = run.overrides.get(field, (run.config or {}).get(field))
    if _is_relative(value):
      task_run.overrides[field] = os.path.abspath(value)
  return task_run


def run_all(runs: list[sweep_lib.Run], base: str, *, address: str = '', cpus_per_run: float = 1,
            gpus_per_run: float = 0, retries: int = 2,
            log: Callable[[str], None] = print) -> list[Outcome]:
  """Trains the runs that are not finished as Ray tasks; returns their outcomes.

  Finished runs are skipped and refused ones reported before anything is
  scheduled (as the local launcher does); with nothing to train, Ray is not
  even started.
  """
  todo = []
  for i, run in enumerate(runs, 1):
    head = f'[{i}/{len(runs)}] {run.point} seed {run.seed}'
    if run.done:
      log(f'{head}: finished earlier, skipped.')
    elif (refusal := sweep_lib.refused(run)):
      log(f'{head}: REFUSED: {refusal}')
    else:
      todo.append((head, run))
  if not todo:
    return []
  import ray  # pylint: disable=g-import-not-at-top  # The optional extra.

  base = _absolute(base)
  tasks = [(head, run, for_workers(run)) for head, run in todo]
  # One marker per sweep folder, named for this sweep: a stale one proves nothing.
  token = uuid.uuid4().hex[:16]
  markers = {r.root: os.path.join(r.root, MARKER + token) for _, _, r in tasks}
  try:
    for marker in markers.values():
      storage.write_text(marker, f'vgg_flax sweep on {socket.gethostname()}, PID {os.getpid()}\n')
    for _, run, _ in tasks:
      storage.makedirs(run.workdir)  # A shared disk; a no-op on buckets.
    started_here = not ray.is_initialized()
    if started_here:
      ray.init(address=address or None, include_dashboard=False, log_to_driver=False,
               configure_logging=False)
    try:
      # Ray retries nothing itself: the driver judges every attempt (_wait).
      task = ray.remote(train_run).options(num_cpus=cpus_per_run, num_gpus=gpus_per_run,
                                           max_retries=0)

      def submit(task_run: sweep_lib.Run):
        return task.remote(task_run, base, markers[task_run.root])
      pending = {submit(task_run): (head, run, task_run, 1) for head, run, task_run in tasks}
      log(f'{len(pending)} runs scheduled on Ray ({cpus_per_run:g} CPU, {gpus_per_run:g} GPU '
          f'each; cluster: {_resources(ray)}).')
      return _wait(ray, pending, submit, retries, log)
    finally:
      if started_here:
        ray.shutdown()  # After _wait, which leaves no run in flight.
  finally:
    for marker in markers.values():
      with contextlib.suppress(OSError):  # A marker left behind is harmless.
        storage.remove(marker)


def _resources(ray) -> str:
  total = ray.cluster_resources()
  return ', '.join(f'{total.get(k, 0):g} {k}' for k in ('CPU', 'GPU'))


def _line(text: str, last: bool = False) -> str:
  """The first (or last) line of a message, without its full stop (the log adds one)."""
  lines = text.strip().splitlines() or ['']
  return (lines[-1] if last else lines[0]).rstrip('.')


def _judge(ray, ref, run: sweep_lib.Run) -> tuple[dict[str, Any], str, bool]:
  """(the attempt's span, why it failed or '', whether another attempt may help)."""
  try:
    span = ray.get(ref)
  except ray.exceptions.RayTaskError as e:  # train_run raised: WorkdirNotShared, ...
    cause = e.cause or e  # Else a traceback: its last line is the exception.
    return {}, _line(str(cause), last=True), not isinstance(cause, WorkdirNotShared)
  except ray.exceptions.RayError as e:  # Ray lost the task: the worker or node died, OOM, ...
    return {}, f'{type(e).__name__}: {_line(str(e))}', True
  code = span.pop('code')
  if code or not run.done:  # As the local launcher: SIGTERM's save exits 0, unfinished.
    return span, (f'exit {code}{"" if code else " before the run finished"}; see '
                  f'{os.path.join(run.workdir, workdirs.LOG_FILE)}'), True
  return span, '', False


def _wait(ray, pending: dict, submit: Callable[[sweep_lib.Run], Any], retries: int,
          log: Callable[[str], None]) -> list[Outcome]:
  """Collects the attempts as they end, scheduling the next attempt of a failed
  run while it has retries left; on Ctrl-C, SIGTERM or an error here, stops
  those still running (each saves) before passing it on."""
  from vgg_flax.training import reporting  # pylint: disable=g-import-not-at-top  # Loads JAX: the driver's.
  outcomes, total, start = [], len(pending), time.time()

  def interrupt(signum, frame):  # pylint: disable=unused-argument
    raise KeyboardInterrupt
  previous = signal.signal(signal.SIGTERM, interrupt)
  try:
    while pending:
      [ref], _ = ray.wait(list(pending), num_returns=1)
      head, run, task_run, attempt = pending.pop(ref)
      span, error, retriable = _judge(ray, ref, run)
      if error and retriable and attempt <= retries:
        pending[submit(task_run)] = (head, run, task_run, attempt + 1)
        log(f'{head}: attempt {attempt} FAILED: {error}; retrying (attempt {attempt + 1} of '
            f'{retries + 1}).')
        continue
      outcomes.append(Outcome(run, not error, error=error, **span))
      status = (f'FAILED: {error}' if error else
                f'done in {(span["end"] - span["start"]) / 60:.1f} min on {span["node"]}')
      log(f'{head}: {status}. '
          f'{reporting.countdown(len(outcomes), total, time.time() - start, "runs")}')
    return outcomes
  except BaseException as e:  # Ctrl-C, SIGTERM, or a bug: not a reason to lose training.
    what = 'Interrupted' if isinstance(e, KeyboardInterrupt) else type(e).__name__
    log(f'{what}: stopping {len(pending)} runs (each saves its checkpoint); run the same '
        'command to continue.')
    for ref in pending:
      ray.cancel(ref)  # A KeyboardInterrupt in the task: launch() passes SIGTERM on.
    ray.wait(list(pending), num_returns=len(pending), timeout=600)
    raise
  finally:
    signal.signal(signal.SIGTERM, previous)
