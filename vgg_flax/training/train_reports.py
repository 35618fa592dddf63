"""The trainer's reports of its training metrics, every `log_every_steps` steps, and of
its evaluations.

Each step's metrics stay on the device until a report pulls them all at once;
a report checks them (a non-finite loss or gradient stops the run, or is
skipped with config.on_nonfinite='skip'), then logs and writes their means
with the speed and MFU. A `Display` shows the same reports another way (a
notebook's progress bar: `vgg_flax.notebook`).
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol

from absl import logging
import jax
import numpy as np

from vgg_flax.training import launch
from vgg_flax.training import reporting


class Display(Protocol):
  """Shows the reports besides the log: `train_and_evaluate(..., display=...)`."""

  def train(self, step: int, total_steps: int, scalars: Mapping[str, float],
            speed: Mapping[str, float]) -> None:
    """A training report: train_* means and learning_rate, `reporting.Progress.update`'s speed."""

  def evaluation(self, step: int, results: Mapping[str, float], seconds: float) -> None:
    """An evaluation: eval_loss, eval_accuracy, eval_top5_accuracy."""


class Reports:
  """Training metrics: kept on the device until a report pulls them (the loop's only
  host sync), then checked, logged and written; and the evaluations."""

  def __init__(self, setup: launch.Setup, writer, progress: reporting.Progress,
               display: Display | None = None):
    self.setup, self.writer, self.progress, self.display = setup, writer, progress, display
    self.pending: list[Any] = []

  def train(self, step: int) -> None:
    """Reports the steps run since the last report, `step` the latest.

    Raises:
      FloatingPointError: one of them had a non-finite loss or gradient
        (config.on_nonfinite='stop').
    """
    config, setup = self.setup.config, self.setup
    fetched = jax.device_get(self.pending)
    self.pending.clear()
    bad = [m['nonfinite'] for m in fetched]
    if any(bad) and config.on_nonfinite == 'stop':
      first = step - len(fetched) + 1 + bad.index(True)
      raise FloatingPointError(
          f'Non-finite loss or gradient at step {first} (loss {fetched[bad.index(True)]["loss"]}); '
          f'stopped. The last good checkpoint (step {setup.ckpt.latest_step()}) is kept in '
          f'{setup.workdir}; --config.on_nonfinite=skip skips such steps instead.')
    good = [m for m, b in zip(fetched, bad) if not b] or fetched
    scalars = {f'train_{k}': float(np.mean([m[k] for m in good]))
               for k in ('loss', 'accuracy', 'grad_norm')}
    scalars['learning_rate'] = float(fetched[-1]['learning_rate'])
    if any(bad):
      scalars['train_skipped_steps'] = float(sum(bad))
    speed = self.progress.update(step)
    # No rate, ETA or MFU on a report right after the (compiling) first step.
    rates = reporting.throughput(speed, setup.flops_per_image,
                                 setup.peak_flops * jax.device_count())
    logging.info(self.progress.line(step, step / setup.steps_per_epoch, scalars, speed,
                                    rates.get('train_mfu')))
    self.writer.write_scalars(step, {**scalars, **rates})
    if self.display is not None:
      self.display.train(step, setup.total_steps, scalars, speed)

  def evaluation(self, step: int, results: Mapping[str, float], seconds: float) -> None:
    """Logs and writes an evaluation at `step` that took `seconds`."""
    self.writer.write_scalars(step, {**results, 'eval_seconds': seconds})
    logging.info('eval at step %d: %s (%.1f s)', step,
                 ' '.join(f'{k}={v:.4f}' for k, v in results.items()), seconds)
    if self.display is not None:
      self.display.evaluation(step, results, seconds)
