"""A sweep's runs on a Ray cluster: `python -m vgg_flax.sweep ... --launcher=ray`.

Every run is the same `python -m vgg_flax.train` command as with the local
launcher (`--print_commands` prints it), executed as a subprocess inside a Ray
task that asks for the run's CPUs and GPUs: Ray places it where they are
free, runs as many side by side as the cluster holds, and gives a GPU task
only its own GPUs (CUDA_VISIBLE_DEVICES). A run that exits non-zero is
retried `retries` times; each attempt resumes from the run's checkpoint. One
that keeps failing is reported by name; the others go on. Ctrl-C or SIGTERM
on the sweep cancels the tasks: each passes SIGTERM to its trainer, which
saves a checkpoint, and the same command later continues.

Where Ray runs: `ray_address=''` starts a Ray instance on this machine for
the sweep; 'auto' or 'host:port' joins a running cluster (`ray start --head`
on one node, `ray start --address=...` on the others; inside a SLURM
allocation, or KubeRay). Every node needs vgg_flax installed, the base config
file at the same path, and the sweep's --workdir on storage all nodes see
(a shared disk, or gs://): a task that cannot see its run's workdir fails
with that message instead of training into a local folder.

Ray is the optional extra `vgg_flax[ray]`; nothing else imports this module.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import time
from typing import Any, Callable

from vgg_flax import reporting
from vgg_flax import storage
from vgg_flax import sweep as sweep_lib


class RunFailed(RuntimeError):
  """The trainer exited non-zero: Ray retries the task."""


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


def check_visible(workdir: str) -> None:
  """Raises WorkdirNotShared unless this process sees `workdir` (the driver made it)."""
  if not storage.exists(workdir):
    raise WorkdirNotShared(
        f'a worker on {socket.gethostname()} cannot see the run workdir {workdir}: a Ray '
        'sweep needs its --workdir on storage every node sees (a shared disk, or gs://).')


def train_run(run: sweep_lib.Run, base: str) -> dict[str, Any]:
  """The body of a run's Ray task: one attempt at the training command."""
  check_visible(run.workdir)
  start = time.time()
  code = sweep_lib.launch(run, base)
  if code:
    raise RunFailed(f'exit {code}; see {os.path.join(run.workdir, sweep_lib.LOG_FILE)}')
  return {'start': start, 'end': time.time(), 'node': socket.gethostname()}


def _absolute(base: str) -> str:
  """The base config as an absolute path: tasks do not run in the driver's folder."""
  path, sep, arg = base.partition(':')
  return os.path.abspath(path) + sep + arg if os.path.exists(path) else base


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
  started_here = not ray.is_initialized()
  if started_here:
    ray.init(address=address or None, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
  task = ray.remote(train_run).options(
      num_cpus=cpus_per_run, num_gpus=gpus_per_run, max_retries=retries,
      retry_exceptions=[RunFailed])
  try:
    pending = {}
    for head, run in todo:
      storage.makedirs(run.workdir)
      pending[task.remote(run, base)] = (head, run)
    log(f'{len(pending)} runs scheduled on Ray ({cpus_per_run:g} CPU, {gpus_per_run:g} GPU '
        f'each; cluster: {_resources(ray)}).')
    return _wait(ray, pending, log)
  finally:
    if started_here:
      ray.shutdown()


def _resources(ray) -> str:
  total = ray.cluster_resources()
  return ', '.join(f'{total.get(k, 0):g} {k}' for k in ('CPU', 'GPU'))


def _wait(ray, pending: dict, log: Callable[[str], None]) -> list[Outcome]:
  """Collects the tasks as they finish; on Ctrl-C or SIGTERM, stops them all."""
  outcomes, total, start = [], len(pending), time.time()

  def interrupt(signum, frame):  # pylint: disable=unused-argument
    raise KeyboardInterrupt
  previous = signal.signal(signal.SIGTERM, interrupt)
  try:
    while pending:
      [ref], _ = ray.wait(list(pending), num_returns=1)
      head, run = pending.pop(ref)
      try:
        span = ray.get(ref)
        outcomes.append(Outcome(run, True, **span))
        status = f'done in {(span["end"] - span["start"]) / 60:.1f} min on {span["node"]}'
      except (ray.exceptions.RayTaskError, ray.exceptions.WorkerCrashedError) as e:
        cause = getattr(e, 'cause', None) or e
        outcomes.append(Outcome(run, False, error=str(cause).strip().splitlines()[-1]))
        status = f'FAILED: {outcomes[-1].error}'
      done = total - len(pending)
      log(f'{head}: {status}. {reporting.countdown(done, total, time.time() - start, "runs")}')
    return outcomes
  except KeyboardInterrupt:
    log(f'Interrupted: stopping {len(pending)} runs (each saves its checkpoint); run the same '
        'command to continue.')
    for ref in pending:
      ray.cancel(ref)  # A KeyboardInterrupt in the task: launch() passes SIGTERM on.
    ray.wait(list(pending), num_returns=len(pending), timeout=600)
    raise
  finally:
    signal.signal(signal.SIGTERM, previous)
