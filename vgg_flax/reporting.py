"""Metrics out of the trainer: TensorBoard, metrics.jsonl, a progress line, curves.png.

Only process 0 writes files; every other process only logs.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Any, Iterator, Mapping

import jax
from clu import metric_writers
from clu.metric_writers import interface

METRICS_FILE = 'metrics.jsonl'
CURVES_FILE = 'curves.png'


class JsonlWriter(interface.MetricWriter):
  """Appends one JSON object per `write_scalars` call: {"step": N, key: value}.

  On resume, lines for steps after the restored checkpoint are dropped first:
  those steps are about to be trained again and would otherwise appear twice.
  """

  def __init__(self, path: str, *, resume_step: int = 0):
    self._path = path
    if os.path.exists(path):
      kept = [line for line in read_metrics(path) if line['step'] <= resume_step]
      with open(path, 'w') as f:
        f.writelines(json.dumps(line) + '\n' for line in kept)
    self._file = open(path, 'a')

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    row = {'step': int(step)}
    row.update({k: float(v) for k, v in scalars.items()})
    self._file.write(json.dumps(row) + '\n')
    self._file.flush()

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    pass  # config.json holds the full config.

  # The other summary kinds are not produced by the trainer.
  def write_summaries(self, step, values, metadata=None) -> None:
    pass

  def write_images(self, step, images) -> None:
    pass

  def write_videos(self, step, videos) -> None:
    pass

  def write_audios(self, step, audios, *, sample_rate) -> None:
    pass

  def write_texts(self, step, texts) -> None:
    pass

  def write_histograms(self, step, arrays, num_buckets=None) -> None:
    pass

  def flush(self) -> None:
    self._file.flush()

  def close(self) -> None:
    self._file.close()


def read_metrics(path: str) -> list[dict[str, float]]:
  """The rows of a metrics.jsonl file, in order."""
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def create_writer(workdir: str, *, resume_step: int = 0) -> metric_writers.MetricWriter:
  """TensorBoard + metrics.jsonl on process 0; logging only elsewhere."""
  if jax.process_index() > 0:
    return metric_writers.create_default_writer(just_logging=True)
  return metric_writers.MultiWriter([
      metric_writers.create_default_writer(workdir, asynchronous=False),
      JsonlWriter(os.path.join(workdir, METRICS_FILE), resume_step=resume_step),
  ])


def _duration(seconds: float) -> str:
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}h{m:02d}m' if h else f'{m}m{s:02d}s'


class _Timer:
  seconds = 0.0


class Progress:
  """Training throughput and ETA between two reports.

  Only training steps count: the first step (compilation) is timed apart by
  `restart_after`, and evaluations and checkpoints run inside `paused()`.
  """

  def __init__(self, total_steps: int, batch_size: int, start_step: int):
    self.total_steps = total_steps
    self.batch_size = batch_size
    self._step = start_step
    self._time = time.perf_counter()
    self._paused = 0.0

  def restart_after(self, outputs: Any, step: int) -> float:
    """Waits for `outputs` of `step` and starts counting from there.

    Returns:
      Seconds since the last (re)start: the first step's compile and run.
    """
    jax.block_until_ready(outputs)
    now = time.perf_counter()
    seconds = now - self._time
    self._step, self._time, self._paused = step, now, 0.0
    return seconds

  @contextlib.contextmanager
  def paused(self) -> Iterator[_Timer]:
    """Time spent inside is not training time; the timer holds its seconds."""
    timer = _Timer()
    start = time.perf_counter()
    try:
      yield timer
    finally:
      timer.seconds = time.perf_counter() - start
      self._paused += timer.seconds

  def update(self, step: int) -> dict[str, float]:
    """Called after metrics were fetched at `step` (the device has caught up)."""
    now = time.perf_counter()
    elapsed = max(now - self._time - self._paused, 1e-9)
    steps_per_sec = (step - self._step) / elapsed
    self._step, self._time, self._paused = step, now, 0.0
    return {'steps_per_sec': steps_per_sec,
            'images_per_sec': steps_per_sec * self.batch_size,
            'eta_seconds': (self.total_steps - step) / max(steps_per_sec, 1e-9)}

  def line(self, step: int, epoch: float, scalars: Mapping[str, float],
           speed: Mapping[str, float]) -> str:
    shown = ' '.join(f'{k}={v:.4g}' for k, v in scalars.items())
    return (f'step {step}/{self.total_steps} (epoch {epoch:.2f}) {shown} | '
            f'{speed["images_per_sec"]:.1f} img/s | ETA {_duration(speed["eta_seconds"])}')


def plot_curves(metrics_path: str, png_path: str) -> None:
  """Loss and accuracy against step, train and eval, from metrics.jsonl."""
  import matplotlib  # Imported here: only the end of a run needs it.
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt

  rows = read_metrics(metrics_path)
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for ax, name in zip(axes, ('loss', 'accuracy')):
    for split, style in (('train', '-'), ('eval', 'o-')):
      key = f'{split}_{name}'
      points = [(r['step'], r[key]) for r in rows if key in r]
      if points:
        steps, values = zip(*points)
        ax.plot(steps, values, style, label=split, markersize=3)
    ax.set_xlabel('step')
    ax.set_ylabel(name)
    ax.grid(alpha=0.3)
    ax.legend()
  axes[0].set_yscale('log')
  fig.tight_layout()
  fig.savefig(png_path, dpi=100)
  plt.close(fig)
