"""metrics.jsonl, the progress line and curves.png."""

import json
import os

from vgg_flax import reporting


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


def test_progress_line_has_throughput_and_eta():
  progress = reporting.Progress(total_steps=100, batch_size=32, start_step=0)
  progress._time -= 2.0  # Pretend 10 steps took 2 s.
  speed = progress.update(10)
  assert 150 < speed['images_per_sec'] <= 160
  line = progress.line(10, 0.5, {'train_loss': 0.25}, speed)
  assert line.startswith('step 10/100 (epoch 0.50) train_loss=0.25 |')
  assert 'img/s | ETA 0m1' in line


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


def test_throughput_counts_training_time_only():
  # Regression: an evaluation or a checkpoint between two reports was counted
  # as training time (~1,000 img/s reported as ~140), and so was compilation.
  import time
  import jax.numpy as jnp
  progress = reporting.Progress(total_steps=100, batch_size=10, start_step=0)
  time.sleep(0.3)  # Compiling the first step.
  assert progress.restart_after(jnp.ones(2), 1) >= 0.3
  time.sleep(0.1)  # Training steps 2-10.
  with progress.paused() as timer:
    time.sleep(0.4)  # Evaluating.
  assert timer.seconds >= 0.4
  speed = progress.update(10)
  assert 9 * 10 / 0.2 < speed['images_per_sec'] <= 9 * 10 / 0.1


def test_countdown_extrapolates_the_average_rate():
  assert reporting.countdown(2, 8, 60.0, 'runs') == '2/8 runs (25%), ETA 3m00s'
  assert reporting.countdown(0, 5, 0.0, 'batches') == '0/5 batches (0%), ETA ?'
