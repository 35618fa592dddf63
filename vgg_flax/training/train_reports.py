"""The trainer's reports of its training metrics, every `log_every_steps` steps.

Each step's metrics stay on the device until a report pulls them all at once;
a report checks them (a non-finite loss or gradient stops the run, or is
skipped with config.on_nonfinite='skip'), then logs and writes their means
with the speed and MFU.
"""

from __future__ import annotations

from typing import Any

from absl import logging
import jax
import numpy as np

from vgg_flax.training import launch
from vgg_flax.training import reporting


class Reports:
  """Training metrics: kept on the device until a report pulls them (the loop's only
  host sync), then checked, logged and written."""

  def __init__(self, setup: launch.Setup, writer, progress: reporting.Progress):
    self.setup, self.writer, self.progress = setup, writer, progress
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
