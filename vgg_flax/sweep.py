"""The ablation engine: a grid of training runs over seeds, then a table and plots.

  python -m vgg_flax.sweep --config=configs/sweeps/depth.py --workdir=runs/depth
  python -m vgg_flax.sweep --config=configs/sweeps/depth.py --workdir=runs/depth \
      --print_commands   # one `python -m vgg_flax.train` line per run, for a cluster
  python -m vgg_flax.sweep --config=configs/sweeps/depth.py --workdir=gs://b/depth \
      --launcher=ray --ray_address=auto --gpus_per_run=1   # side by side on Ray: sweeps/sweep_ray.py

Each run is a plain `python -m vgg_flax.train` in WORKDIR/<point>/seed<k>: an
interrupted run resumes from its checkpoint, a finished one is skipped. Then
REPORT_DIR (default WORKDIR) gets the report of sweeps/sweep_report.py:
results.csv, results.md and results.png.

What a sweep file holds, the grid and the local launcher: `vgg_flax.sweeps.grid`
(re-exported here for sweep files: `from vgg_flax import sweep; sweep.axis(...)`).
"""

import importlib.util
import os
import shlex
import sys

from absl import app
from absl import flags

from vgg_flax.io.run_config import load_config_file  # Also `sweep.load_config_file` for scripts.
from vgg_flax.runtime import cli
# The grid's API, for sweep files and scripts (`sweep.axis`, `sweep.plan`, ...).
from vgg_flax.sweeps.grid import (  # pylint: disable=unused-import
    ATTEMPT_MARK, CSV_FILE, PLOT_FILE, TABLE_FILE, Run, axis, collect, launch,
    markdown_table, named_axis, plan, plot, refused, report, run_all,
    summarize, write_csv)


def define_flags() -> None:
  """The CLI's flags; defined only when run as a script (sweep files import this module too)."""
  flags.DEFINE_string('config', None, 'Sweep file (configs/sweeps/*.py).', required=True)
  flags.DEFINE_string('workdir', None, 'Sweep folder: one workdir per run.', required=True)
  flags.DEFINE_string('report_dir', None, 'Where results.{csv,md,png} go; default --workdir.')
  flags.DEFINE_bool('print_commands', False, 'Print one training command per run and exit.')
  flags.DEFINE_enum('launcher', 'local', ('local', 'ray'),
                    'local: one run after another here; ray: runs as Ray tasks, side by side '
                    'as far as the cluster\'s resources allow (pip install vgg_flax[ray]).')
  flags.DEFINE_string('ray_address', '', "--launcher=ray: '' starts Ray on this machine; 'auto' "
                      'or host:port joins a running cluster.')
  flags.DEFINE_float('cpus_per_run', 1, '--launcher=ray: CPUs Ray reserves for each run.')
  flags.DEFINE_float('gpus_per_run', 0, '--launcher=ray: GPUs per run (each run sees only its '
                     'own).')
  flags.DEFINE_integer('retries', 2, '--launcher=ray: attempts after a failed one, each resuming '
                       'from the run\'s checkpoint.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  if f.launcher == 'ray':
    if f.cpus_per_run < 0 or f.gpus_per_run < 0 or f.retries < 0:
      raise app.UsageError('--cpus_per_run, --gpus_per_run and --retries must be >= 0.')
    if importlib.util.find_spec('ray') is None:
      raise ImportError("--launcher=ray needs Ray: pip install 'vgg_flax[ray]'.")
  sweep = load_config_file(f.config)
  runs = plan(sweep, f.workdir)
  if f.print_commands:
    for run in runs:
      print(shlex.join(run.command(sweep.base)))
    return
  print(f'{len(runs)} runs ({len(runs) // len(sweep.seeds)} points x {len(sweep.seeds)} seeds) '
        f'in {f.workdir}.', flush=True)

  def log(line: str) -> None:
    print(line, flush=True)
  if f.launcher == 'ray':
    from vgg_flax.sweeps import sweep_ray  # pylint: disable=g-import-not-at-top  # Optional extra.
    outcomes = sweep_ray.run_all(runs, sweep.base, address=f.ray_address,
                                 cpus_per_run=f.cpus_per_run, gpus_per_run=f.gpus_per_run,
                                 retries=f.retries, log=log)
    failed = [o.run for o in outcomes if not o.ok] + [r for r in runs if refused(r)]
  else:
    failed = run_all(runs, sweep.base, log=log)
  report_dir = f.report_dir or f.workdir
  if report(sweep, runs, report_dir):
    print(f'Report: {", ".join(os.path.join(report_dir, f) for f in (CSV_FILE, TABLE_FILE, PLOT_FILE))}')
  if failed:
    sys.exit(f'{len(failed)} runs failed: ' + ', '.join(r.workdir for r in failed))


if __name__ == '__main__':
  cli.run(main, define_flags)
