"""A sweep's report: results.csv (one row per run), results.md (mean and spread
over seeds per point) and results.png (accuracy, parameters and throughput
along the first axis), from the finished runs' result.json and metrics.

Light to import (vgg_flax.sweep, which every Ray task of a sweep imports,
re-exports it): `reporting`, which loads JAX and TensorFlow, is imported where
used.
"""

from __future__ import annotations

import csv
import io
import math
import re
from typing import Any, TYPE_CHECKING

import ml_collections
import numpy as np

from vgg_flax.io import storage
from vgg_flax.io import workdirs

if TYPE_CHECKING:
  from vgg_flax.sweeps.grid import Run

CSV_FILE, TABLE_FILE, PLOT_FILE = 'results.csv', 'results.md', 'results.png'


def collect(runs: list[Run]) -> list[dict[str, Any]]:
  """One row per finished run: its point, seed, final evaluation, size and speed."""
  from vgg_flax.training import reporting  # pylint: disable=g-import-not-at-top  # Heavy: see above.
  rows = []
  for run in runs:
    if not run.done:
      continue
    result = run.result()
    metrics = reporting.read_metrics(workdirs.Workdir(run.workdir).metrics)
    # Training steps only: compilation, evaluations and checkpoints are timed apart.
    speeds = [r['train_images_per_sec'] for r in metrics if 'train_images_per_sec' in r]
    rows.append({**run.labels, 'seed': run.seed, 'step': result['step'],
                 'eval_accuracy': result['eval']['eval_accuracy'],
                 'eval_top5_accuracy': result['eval']['eval_top5_accuracy'],
                 'eval_loss': result['eval']['eval_loss'],
                 'best_eval_accuracy': result['best'],
                 'num_params': result['num_params'],
                 'train_gflops_per_image': result['train_flops_per_image'] / 1e9,
                 'train_images_per_sec': float(np.median(speeds)) if speeds else math.nan,
                 'workdir': run.workdir})
  return rows


def summarize(rows: list[dict[str, Any]], axis_names: list[str]) -> list[dict[str, Any]]:
  """Mean and sample standard deviation over seeds, per point, in grid order."""
  groups: dict[tuple, list[dict[str, Any]]] = {}
  for row in rows:
    groups.setdefault(tuple(row[a] for a in axis_names), []).append(row)
  summary = []
  for key, group in groups.items():
    acc = np.array([r['eval_accuracy'] for r in group])
    summary.append({
        **dict(zip(axis_names, key)), 'seeds': len(group),
        'accuracy_mean': float(acc.mean()),
        'accuracy_std': float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
        'top5_mean': float(np.mean([r['eval_top5_accuracy'] for r in group])),
        'loss_mean': float(np.mean([r['eval_loss'] for r in group])),
        'num_params': group[0]['num_params'],
        'gflops': group[0]['train_gflops_per_image'],
        'images_per_sec': float(np.nanmean([r['train_images_per_sec'] for r in group])),
        'accuracies': acc.tolist()})
  return summary


def write_csv(rows: list[dict[str, Any]], path: str) -> None:
  text = io.StringIO(newline='')
  writer = csv.DictWriter(text, fieldnames=list(rows[0]))
  writer.writeheader()
  writer.writerows(rows)
  storage.write_text(path, text.getvalue())


def markdown_table(summary: list[dict[str, Any]], axis_names: list[str], title: str) -> str:
  """Accuracy as mean ± std over seeds (in %), with parameters and speed."""
  header = axis_names + ['params', 'train GFLOP/img', 'top-1 acc. (%)', 'top-1 err. (%)',
                         'top-5 acc. (%)', 'seeds', 'train img/s']
  lines = [f'### {title}', '', '| ' + ' | '.join(header) + ' |',
           '|' + '---|' * len(header)]
  for s in summary:
    acc, std = 100 * s['accuracy_mean'], 100 * s['accuracy_std']
    cells = [str(s[a]) for a in axis_names] + [
        f'{s["num_params"]:,}', f'{s["gflops"]:.3f}', f'{acc:.2f} ± {std:.2f}',
        f'{100 - acc:.2f}', f'{100 * s["top5_mean"]:.2f}', str(s['seeds']),
        f'{s["images_per_sec"]:.0f}']
    lines.append('| ' + ' | '.join(cells) + ' |')
  lines += ['', 'Accuracy: final evaluation of each run; ± is the sample standard deviation '
            'over seeds. img/s: median training throughput of each run after compilation, '
            'averaged over seeds.']
  return '\n'.join(lines) + '\n'


def plot(summary: list[dict[str, Any]], rows: list[dict[str, Any]], axis_names: list[str],
         x_label: str, path: str) -> None:
  """Accuracy (mean ± std, each seed a dot), parameters and throughput along the first
  axis; one line per combination of the other axes."""
  import matplotlib  # Only the report needs it.
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt
  from vgg_flax.training import reporting  # pylint: disable=g-import-not-at-top  # Heavy: see above.

  first, rest = axis_names[0], axis_names[1:]
  ticks = list(dict.fromkeys(s[first] for s in summary))
  numeric = all(re.fullmatch(r'-?\d+(\.\d+)?', t) for t in ticks)
  position = {t: (float(t) if numeric else i) for i, t in enumerate(ticks)}
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
  series = dict.fromkeys(tuple(s[a] for a in rest) for s in summary)
  for key in series:
    group = [s for s in summary if tuple(s[a] for a in rest) == key]
    xs = [position[s[first]] for s in group]
    name = ', '.join(f'{a}={v}' for a, v in zip(rest, key)) or None
    line = axes[0].errorbar(xs, [100 * s['accuracy_mean'] for s in group],
                            yerr=[100 * s['accuracy_std'] for s in group], marker='o',
                            capsize=4, label=name)
    for r in rows:
      if tuple(r[a] for a in rest) == key:
        axes[0].plot(position[r[first]], 100 * r['eval_accuracy'], '.', alpha=0.4,
                     color=line[0].get_color())
    axes[1].plot(xs, [s['num_params'] / 1e6 for s in group], 'o-', label=name)
    axes[2].plot(xs, [s['images_per_sec'] for s in group], 'o-', label=name)
  for ax, ylabel in zip(axes, ('top-1 accuracy (%), mean ± std over seeds',
                               'parameters (millions)', 'training images/s')):
    ax.set_xlabel(x_label or first)
    ax.set_ylabel(ylabel)
    ax.set_xticks([position[t] for t in ticks], ticks)
    ax.grid(alpha=0.3)
    if rest:
      ax.legend()
  reporting.save_figure(fig, path)


def report(sweep: ml_collections.ConfigDict, runs: list[Run], report_dir: str) -> list[dict]:
  """Writes results.csv, results.md and results.png; returns the per-point summary."""
  axis_names = [name for name, _ in sweep.axes]
  rows = collect(runs)
  if not rows:
    return []
  storage.makedirs(report_dir)
  summary = summarize(rows, axis_names)
  out = storage.path(report_dir)
  write_csv(rows, out / CSV_FILE)
  storage.write_text(out / TABLE_FILE, markdown_table(summary, axis_names,
                                                      sweep.get('title', 'Sweep')))
  plot(summary, rows, axis_names, sweep.get('x_label', ''), out / PLOT_FILE)
  return summary
