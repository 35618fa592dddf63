"""metrics.jsonl, the progress line and curves.png."""

import json
import os

import numpy as np
import pytest

from vgg_flax.training import reporting


class _Clock:
  """A perf_counter that moves only when the test says: no sleep, no overshoot."""

  def __init__(self):
    self.now = 1000.0

  def perf_counter(self):
    return self.now


def test_jsonl_rows_and_resume_truncation(tmp_path):
  path = str(tmp_path / 'metrics.jsonl')
  writer = reporting.JsonlWriter(path)
  for step in (10, 20, 30):
    writer.write_scalars(step, {'train_loss': 1.0 / step})
  writer.close()
  assert [r['step'] for r in reporting.read_metrics(path)] == [10, 20, 30]
  # Resuming from the checkpoint at step 20 drops the row of step 30.
  writer = reporting.JsonlWriter(path, resume_step=20)
  writer.write_scalars(30, {'train_loss': 0.5})
  writer.close()
  rows = reporting.read_metrics(path)
  assert [r['step'] for r in rows] == [10, 20, 30]
  assert rows[-1] == {'step': 30, 'train_loss': 0.5}
  with open(path) as f:
    assert all(json.loads(line) for line in f)


def test_progress_line_has_throughput_and_eta(monkeypatch):
  clock = _Clock()
  monkeypatch.setattr(reporting, 'time', clock)
  progress = reporting.Progress(total_steps=100, batch_size=32, start_step=0)
  clock.now += 2.0  # 10 steps take 2 s.
  speed = progress.update(10)
  assert speed['images_per_sec'] == 160.0
  line = progress.line(10, 0.5, {'train_loss': 0.25}, speed)
  assert line == 'step 10/100 (epoch 0.50) train_loss=0.25 | 160.0 img/s | ETA 0m18s'


def test_curves_png(tmp_path):
  path = str(tmp_path / 'metrics.jsonl')
  writer = reporting.JsonlWriter(path)
  for step in range(1, 6):
    writer.write_scalars(step, {'train_loss': 1.0 / step, 'train_accuracy': step / 10})
  writer.write_scalars(5, {'eval_loss': 0.3, 'eval_accuracy': 0.9})
  writer.close()
  png = str(tmp_path / 'curves.png')
  reporting.plot_curves(path, png)
  with open(png, 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  assert os.path.getsize(png) > 5000


def test_throughput_counts_training_time_only(monkeypatch):
  # Regression: an evaluation or a checkpoint between two reports was counted
  # as training time (~1,000 img/s reported as ~140), and so was compilation.
  clock = _Clock()
  monkeypatch.setattr(reporting, 'time', clock)
  progress = reporting.Progress(total_steps=100, batch_size=10, start_step=0)
  clock.now += 30.0  # Compiling the first step.
  assert progress.restart_after(np.ones(2), 1) == 30.0
  clock.now += 0.5  # Training steps 2-6.
  with progress.paused() as timer:
    clock.now += 40.0  # Evaluating.
  assert timer.seconds == 40.0
  clock.now += 0.5  # Training steps 7-10.
  with progress.paused():
    clock.now += 20.0  # Saving a checkpoint.
  speed = progress.update(10)
  assert speed['images_per_sec'] == pytest.approx(9 * 10 / 1.0)
  assert speed['eta_seconds'] == pytest.approx(90 / 9.0)
  # The next report counts from this one: nothing paused before it carries over.
  clock.now += 2.0
  assert progress.update(20)['images_per_sec'] == pytest.approx(10 * 10 / 2.0)


def test_countdown_extrapolates_the_average_rate():
  assert reporting.countdown(2, 8, 60.0, 'runs') == '2/8 runs (25%), ETA 3m00s'
  assert reporting.countdown(0, 5, 0.0, 'batches') == '0/5 batches (0%), ETA ?'
