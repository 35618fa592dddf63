"""The ablation grid: runs over a sweep file's axes and seeds, and the local launcher.

A sweep file's `get_config()` returns a ConfigDict with
  base:  the training config file every run starts from (a path, as for --config);
  fixed: (field, value) pairs set in every run, e.g. (('num_epochs', 5),);
  axes:  a tuple of axes, each from `axis(...)` or `named_axis(...)`; the runs
         are the product of the axes' points, times
  seeds: the values of `config.seed`;
  title, x_label: for the report.
Every run is a plain `python -m vgg_flax.train` in WORKDIR/<point>/seed<k>, so
an interrupted run resumes from its checkpoint and a finished one (its
`result.json` exists) is skipped. The command line is `vgg_flax.sweep`.

This module is light to import: sweep files import it (through vgg_flax.sweep),
and so does every Ray task of a sweep (sweep_ray.py), whose worker would
otherwise hold JAX and TensorFlow (5 s, 800 MB) for nothing while its trainer
runs. The modules that load them are imported in the functions that use them.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from typing import Any, Sequence

import ml_collections

from vgg_flax import config as config_lib
from vgg_flax.io import run_config
from vgg_flax.io import storage
from vgg_flax.io import workdirs
# The report's parts, also used as sweep.report(...) etc.
from vgg_flax.sweeps.sweep_report import (  # pylint: disable=unused-import
    CSV_FILE, PLOT_FILE, TABLE_FILE, collect, markdown_table, plot, report, summarize, write_csv)

Point = tuple[str, dict[str, Any]]  # (label, {'model.depth': 11, ...})


def axis(name: str, field: str, values: Sequence[Any]) -> tuple[str, tuple[Point, ...]]:
  """An axis varying one config field: axis('depth', 'model.depth', (11, 13, 16, 19))."""
  return name, tuple((str(v), {field: v}) for v in values)


def named_axis(name: str, points: Sequence[Point]) -> tuple[str, tuple[Point, ...]]:
  """An axis of labelled points, each setting several fields:
  named_axis('net', (('2x 3x3', {'model.variant': 'B'}), ('1x 5x5', {...})))."""
  return name, tuple((label, dict(overrides)) for label, overrides in points)


def _slug(text: str) -> str:
  return re.sub(r'[^A-Za-z0-9.,=+-]+', '_', text).strip('_')


class Run:
  """One training run of a sweep: a point of the grid and a seed.

  `config` is the full training config the run must have been trained with
  for its result.json to count (the base file, the sweep's fixed values, the
  point's overrides and the seed). `root` is the sweep's folder, `workdir`
  the run's own below it.
  """

  def __init__(self, labels: dict[str, str], overrides: dict[str, Any], seed: int, workdir: str,
               config: ml_collections.ConfigDict | None = None):
    self.labels, self.seed, self.root = labels, seed, workdir
    self.overrides = {**overrides, 'seed': seed}
    self.point = ','.join(f'{k}={v}' for k, v in labels.items())
    self.workdir = os.path.join(workdir, _slug(self.point), f'seed{seed}')
    self.config = None if config is None else json.loads(config.to_json_best_effort())

  def result(self) -> dict[str, Any] | None:
    """The run's result.json, or None before it has finished."""
    return workdirs.Workdir(self.workdir).read_result()

  def changes(self) -> list[str]:
    """Fields (other than bookkeeping) whose value in the finished run's config
    differs from the sweep's, and num_epochs when it was trained for more (its
    result is not this sweep's, and the trainer refuses to shorten it);
    ['config'] for a result without one."""
    from vgg_flax.training import preflight  # pylint: disable=g-import-not-at-top  # Heavy: see above.
    result = self.result()
    if result is None or self.config is None:
      return []
    if 'config' not in result:
      return ['config']
    fewer_epochs = result['config'].get('num_epochs', 0) > self.config.get('num_epochs', 0)
    return [k for k in preflight.changed_fields(result['config'], self.config)
            if not preflight.is_free(k) or (k == 'num_epochs' and fewer_epochs)]

  @property
  def done(self) -> bool:
    """Finished with the sweep's settings: the same config bar bookkeeping, and
    as many epochs (a sweep given more epochs resumes its runs)."""
    result = self.result()
    if result is None:
      return False
    if self.config is None:
      return True
    stored = result.get('config')
    return (stored is not None and not self.changes()
            and stored.get('num_epochs') == self.config.get('num_epochs'))

  def command(self, base: str, python: str = 'python') -> list[str]:
    args = [f'--config.{k}={v if isinstance(v, str) else repr(v)}'
            for k, v in self.overrides.items()]
    return [python, '-m', 'vgg_flax.train', f'--config={base}',
            f'--workdir={self.workdir}'] + args


def plan(sweep: ml_collections.ConfigDict, workdir: str) -> list[Run]:
  """Every run of `sweep`, each config checked before anything is trained.

  Raises:
    ValueError: naming the sweep field, or the point and the config field it breaks.
  """
  for field in ('base', 'axes', 'seeds'):
    if field not in sweep or not sweep[field]:
      raise ValueError(f'sweep config: field {field!r} is missing or empty; see vgg_flax/sweep.py.')
  if len(set(sweep.seeds)) != len(sweep.seeds):
    raise ValueError(f'sweep config: seeds={tuple(sweep.seeds)} repeats a seed.')
  base = run_config.load_config_file(sweep.base)
  fixed = dict(sweep.get('fixed', ()))
  points: list[tuple[dict[str, str], dict[str, Any]]] = [({}, fixed)]
  for name, axis_points in sweep.axes:
    labels = [label for label, _ in axis_points]
    if len(set(labels)) != len(labels):
      raise ValueError(f'sweep config: axis {name!r} repeats a label: {labels}.')
    points = [({**l, name: label}, {**o, **overrides})
              for l, o in points for label, overrides in axis_points]
  runs = []
  for labels, overrides in points:
    config = copy.deepcopy(base)
    try:
      run_config.apply_overrides(config, overrides)
      config_lib.validate(config)
    except (KeyError, ValueError) as e:
      point = ', '.join(f'{k}={v}' for k, v in labels.items())
      raise ValueError(f'sweep point {point}: {e.args[0]}') from None
    for seed in sweep.seeds:
      seeded = copy.deepcopy(config)
      seeded.seed = seed
      runs.append(Run(labels, overrides, seed, workdir, seeded))
  return runs


ATTEMPT_MARK = b'# vgg_flax.sweep attempt: '


def launch(run: Run, base: str) -> int:
  """Trains `run` in a fresh process (its output appended to WORKDIR/train.log).

  Each attempt starts with a line `# vgg_flax.sweep attempt: <command> on <host>`.
  Interrupted (KeyboardInterrupt, or SIGTERM turned into one by the caller),
  it passes SIGTERM on to the trainer, which saves its checkpoint, waits for
  it, and raises again.
  """
  command = run.command(base, sys.executable)
  mark = ATTEMPT_MARK + f'{shlex.join(command)} on {socket.gethostname()}\n'.encode()
  log_path = workdirs.Workdir(run.workdir).log
  if storage.is_remote(log_path):
    # A bucket object cannot be appended to as a process writes: stream the
    # output into storage.AppendFile, which uploads it every few seconds.
    old = storage.read_bytes(log_path) if storage.exists(log_path) else b''
    log, stdout = storage.AppendFile(log_path, initial=old + mark), subprocess.PIPE
  else:
    log = stdout = open(log_path, 'ab')  # pylint: disable=consider-using-with
    log.write(mark)
    log.flush()
  try:
    with subprocess.Popen(command, stdout=stdout, stderr=subprocess.STDOUT) as proc:
      try:
        if stdout is subprocess.PIPE:
          for line in proc.stdout:
            log.write(line)
        while proc.poll() is None:  # Polling: an interrupt is raised between sleeps.
          time.sleep(0.2)
      except KeyboardInterrupt:
        proc.send_signal(signal.SIGTERM)  # The trainer saves at its current step.
        proc.wait()
        raise
  finally:
    log.close()
  return proc.returncode


def refused(run: Run) -> str | None:
  """Why a finished run of other settings is not trained again (None: it may be)."""
  from vgg_flax.training import preflight  # pylint: disable=g-import-not-at-top  # Heavy: see above.
  changes = run.changes()
  if not changes:
    return None
  result = run.result()
  what = ('has no config (an older vgg_flax)' if changes == ['config'] else
          'was trained with other settings (' + preflight.describe_changes(
              result['config'], run.config, changes) + ')')
  return (f'{os.path.join(run.workdir, workdirs.RESULT_FILE)} {what}; move {run.workdir} away to '
          'train it again, or use another --workdir.')


def run_all(runs: list[Run], base: str, log=print, launcher=launch) -> list[Run]:
  """Trains the runs one after another, skipping finished ones; returns the failed.

  A run that fails is reported and the sweep goes on; running the sweep again
  retries it, resuming from its last checkpoint.
  """
  from vgg_flax.training import reporting  # pylint: disable=g-import-not-at-top  # Heavy: see above.
  failed = []
  to_train = sum(not run.done for run in runs)
  trained, seconds = 0, 0.0
  for i, run in enumerate(runs, 1):
    head = f'[{i}/{len(runs)}] {run.point} seed {run.seed}'
    if run.done:
      log(f'{head}: finished earlier, skipped.')
      continue
    refusal = refused(run)
    if refusal:  # Its result and checkpoints belong to another experiment.
      failed.append(run)
      log(f'{head}: REFUSED: {refusal}')
      continue
    storage.makedirs(run.workdir)
    log(f'{head}: training in {run.workdir} ...')
    start = time.perf_counter()
    code = launcher(run, base)
    minutes = (time.perf_counter() - start) / 60
    trained, seconds = trained + 1, seconds + minutes * 60
    left = reporting.countdown(trained, to_train, seconds, 'runs')
    if code or not run.done:
      failed.append(run)
      log(f'{head}: FAILED (exit {code}) after {minutes:.1f} min; see '
          f'{os.path.join(run.workdir, workdirs.LOG_FILE)}. {left}')
    else:
      log(f'{head}: done in {minutes:.1f} min. {left}')
  return failed
