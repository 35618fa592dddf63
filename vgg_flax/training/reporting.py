"""Metrics out of the trainer: TensorBoard, metrics.jsonl, a progress line, curves.png.

Only process 0 writes files; every other process only logs. Files go through
`vgg_flax.io.storage`, so a `gs://` workdir receives them too. The writers are
the trainer's own, not clu's: importing `clu.metric_writers` imports Keras
(through TensorBoard's hparams API), 0.9 s of every trainer's start.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import time
from typing import Any, Iterator, Mapping

from absl import logging
import jax
import numpy as np

from vgg_flax.io import storage
from vgg_flax.io import workdirs
from vgg_flax.models import flops

CURVES_SIZE = (11, 4)  # Inches: curves.png and `vgg_flax.History.plot`.


class Writers:
  """Several writers as one: each `write_scalars`, `flush` and `close` goes to all."""

  def __init__(self, writers: list[Any]):
    self.writers = writers

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    for writer in self.writers:
      writer.write_scalars(step, scalars)

  def flush(self) -> None:
    for writer in self.writers:
      writer.flush()

  def close(self) -> None:
    for writer in self.writers:
      writer.close()


class JsonlWriter:
  """Appends one JSON object per `write_scalars` call: {"step": N, key: value}.

  On resume, lines for steps after the restored checkpoint are dropped first:
  those steps are about to be trained again and would otherwise appear twice.
  On a bucket the rows reach the object at most every few seconds and at
  `flush`/`close` (see `storage.AppendFile`).
  """

  def __init__(self, path: storage.PathLike, *, resume_step: int = 0):
    initial = None
    if storage.exists(path):
      kept = [row for row in read_metrics(path) if row['step'] <= resume_step]
      initial = ''.join(json.dumps(row) + '\n' for row in kept).encode()
    self._file = storage.AppendFile(path, initial=initial)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    row = {'step': int(step)}
    row.update({k: float(v) for k, v in scalars.items()})
    self._file.write((json.dumps(row) + '\n').encode())

  def flush(self) -> None:
    self._file.flush()

  def close(self) -> None:
    self._file.close()


class EventsWriter:
  """TensorBoard scalars written through `vgg_flax.io.storage`, local or in a bucket.

  The records `tf.summary.scalar` writes (one `Event` per call), with
  TensorBoard's own record framing, into a `storage.AppendFile`, starting a new
  events file every `max_file_bytes`. tf.summary itself goes through
  tf.io.gfile, which cannot reach a storage emulator nor append to objects.
  """

  def __init__(self, logdir: storage.PathLike, *, max_file_bytes: int = 8 << 20):
    from tensorboard.compat.proto import event_pb2  # pylint: disable=g-import-not-at-top
    from tensorboard.plugins.scalar import summary_v2  # pylint: disable=g-import-not-at-top
    from tensorboard.summary.writer import record_writer  # pylint: disable=g-import-not-at-top
    self._event_pb2, self._scalar_pb = event_pb2, summary_v2.scalar_pb
    self._record_writer = record_writer.RecordWriter
    self._logdir = storage.path(logdir)
    self._max_file_bytes = max_file_bytes
    self._index = 0
    self._open()

  def _open(self) -> None:
    # TensorBoard reads every file named *tfevents* in a folder, in name order.
    name = (f'events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.'
            f'{os.getpid()}.{self._index}.v2')
    self._index += 1
    self._file = storage.AppendFile(self._logdir / name)
    self._records = self._record_writer(self._file)
    self._records.write(self._event_pb2.Event(
        wall_time=time.time(), file_version='brain.Event:2').SerializeToString())

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    event = self._event_pb2.Event(wall_time=time.time(), step=int(step))
    for tag, value in scalars.items():
      event.summary.value.extend(self._scalar_pb(tag, np.asarray(value, np.float32)).value)
    self._records.write(event.SerializeToString())
    if self._file.size() >= self._max_file_bytes:
      self._file.close()
      self._open()

  def flush(self) -> None:
    self._file.flush()

  def close(self) -> None:
    self._file.close()


def read_metrics(path: storage.PathLike) -> list[dict[str, float]]:
  """The rows of a metrics.jsonl file, in order.

  A last line cut short (the writer was killed mid-row) is left out: the run
  resumes from a checkpoint older than it anyway. A damaged row before it
  raises ValueError naming the file and line.
  """
  lines = [line for line in storage.read_text(path).splitlines() if line.strip()]
  rows = []
  for number, line in enumerate(lines, 1):
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError as e:
      if number == len(lines):
        logging.warning('%s: the last row is cut short (%s); left out.', path, e)
        break
      raise ValueError(f'{path} line {number} is not valid JSON ({e}); delete that line (the '
                       'others are the run\'s metrics).') from None
  return rows


def create_writer(workdir: storage.PathLike, *, resume_step: int = 0) -> Writers:
  """TensorBoard events + metrics.jsonl on process 0; nothing elsewhere (every
  process logs its progress line)."""
  if jax.process_index() > 0:
    return Writers([])
  return Writers([EventsWriter(workdir),
                  JsonlWriter(workdirs.Workdir(workdir).metrics, resume_step=resume_step)])


def _duration(seconds: float) -> str:
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}h{m:02d}m' if h else f'{m}m{s:02d}s'


def countdown(done: int, total: int, seconds: float, unit: str = '') -> str:
  """'done/total unit (pct%), ETA ...': the rest at the average rate so far."""
  eta = seconds / done * (total - done) if done else float('nan')
  return (f'{done}/{total}{" " + unit if unit else ""} ({done / max(total, 1):.0%}), ETA '
          f'{_duration(eta) if done else "?"}')


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
    """Called after metrics were fetched at `step` (the device has caught up).

    Returns:
      'timed_steps' since the last report or restart, and their
      'steps_per_sec', 'images_per_sec' and 'eta_seconds'. With no step timed
      (a report right after the compiling first step) the rates are unknown:
      0 here, left out by `line` and `throughput`.
    """
    now = time.perf_counter()
    elapsed = max(now - self._time - self._paused, 1e-9)
    timed = step - self._step
    steps_per_sec = timed / elapsed
    self._step, self._time, self._paused = step, now, 0.0
    return {'timed_steps': timed, 'steps_per_sec': steps_per_sec,
            'images_per_sec': steps_per_sec * self.batch_size,
            'eta_seconds': (self.total_steps - step) / max(steps_per_sec, 1e-9)}

  def line(self, step: int, epoch: float, scalars: Mapping[str, float],
           speed: Mapping[str, float], mfu: float | None = None) -> str:
    """'step 10/100 (epoch 0.50) train_loss=0.25 | 160.0 img/s | ETA 0m18s [mfu=4.0%]';
    without a rate, ETA or MFU when no step was timed (`update`)."""
    shown = ' '.join(f'{k}={v:.4g}' for k, v in scalars.items())
    line = f'step {step}/{self.total_steps} (epoch {epoch:.2f}) {shown}'
    if not speed.get('timed_steps', 1):
      return line
    line += f' | {speed["images_per_sec"]:.1f} img/s | ETA {_duration(speed["eta_seconds"])}'
    return line + (f' mfu={mfu:.1%}' if mfu is not None else '')


def throughput(speed: Mapping[str, float], flops_per_image: float,
               peak_flops: float) -> dict[str, float]:
  """train_images_per_sec and train_mfu of a report (`Progress.update`); {} when no step
  was timed, rather than a rate of 0 and an ETA of centuries."""
  if not speed.get('timed_steps', 1):
    return {}
  return {'train_images_per_sec': speed['images_per_sec'],
          'train_mfu': flops.mfu(speed['images_per_sec'], flops_per_image, peak_flops)}


def plot_curves(metrics_path: storage.PathLike, png_path: storage.PathLike) -> None:
  """curves.png: `curves_figure` of metrics.jsonl."""
  save_figure(curves_figure(read_metrics(metrics_path)), png_path)


def curves_figure(rows: list[dict[str, float]], fig=None):
  """Loss and accuracy against step, train and eval, drawn on `fig`.

  Args:
    rows: metrics.jsonl's rows (`read_metrics`).
    fig: a matplotlib Figure of `CURVES_SIZE` (a notebook's, from pyplot); default a new
      one outside pyplot, so that a trainer in a notebook leaves its backend alone.

  Returns:
    The figure.
  """
  from matplotlib import figure  # Imported here: only the end of a run needs it.
  fig = figure.Figure(figsize=CURVES_SIZE) if fig is None else fig
  axes = fig.subplots(1, 2)
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
  return fig


def save_figure(fig, png_path: storage.PathLike) -> None:
  """Writes a matplotlib figure as PNG to a local path or a bucket, and closes it."""
  from matplotlib import pyplot as plt  # Imported here: only the end of a run needs it.
  fig.tight_layout()
  png = io.BytesIO()
  fig.savefig(png, format='png', dpi=100)
  plt.close(fig)
  storage.write_bytes(png_path, png.getvalue())
