"""The Python entry for notebooks: a config in one call, training that returns its history
with a progress bar Jupyter renders, and one image's classes.

  config = vgg_flax.config_from('configs/default.py', {'model.depth': 11, 'num_epochs': 2})
  history = vgg_flax.fit(config, 'runs/mine')   # a progress bar; a line per evaluation
  history.evals[-1]['eval_accuracy']; history.plot()
  vgg_flax.predict_image('runs/mine', 'cat.jpg', top_k=3)   # [('cat', 0.93), ...]

A thin layer over the command lines' functions (`train.train_and_evaluate`,
`predict.predict`): a run trained here is the run `python -m vgg_flax.train`
trains, and either resumes it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
from typing import Any, Iterator, Mapping

from absl import logging
import ml_collections

from vgg_flax import config as config_lib
from vgg_flax import predict
from vgg_flax import train
from vgg_flax.io import run_config
from vgg_flax.io import storage
from vgg_flax.io import workdirs
from vgg_flax.training import reporting

# The checkout vgg_flax runs from: `configs/...` from a notebook in examples/.
_CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config_from(path: str, overrides: Mapping[str, Any] | None = None,
                ) -> ml_collections.ConfigDict:
  """A config file's config with `overrides`, checked and locked as `--config` makes it.

  Args:
    path: `file.py` or `file.py:arg`. A relative path that is not in the current
      folder is taken from the vgg_flax checkout, so `configs/default.py` works
      from any folder.
    overrides: the fields of `--config.FIELD=VALUE`: {'model.depth': 11, 'num_epochs': 2}.

  Returns:
    The config, locked: setting a field it does not have raises.

  Raises:
    KeyError: an override of no field, naming it and the closest field.
    ValueError: a value training would refuse, naming the field and what is allowed.
  """
  file = path.partition(':')[0]
  if not os.path.isabs(file) and not os.path.exists(file):
    if os.path.exists(os.path.join(_CHECKOUT, file)):
      path = os.path.join(_CHECKOUT, path)
  config = run_config.apply_overrides(run_config.load_config_file(path), dict(overrides or {}))
  config_lib.validate(config)
  config.lock()
  return config


@dataclasses.dataclass(frozen=True, repr=False)
class History:
  """A run's metrics, as Keras' `fit` returns them: WORKDIR/metrics.jsonl and result.json."""

  workdir: str
  rows: list[dict[str, float]]  # Every row of metrics.jsonl, in order.
  result: dict[str, Any] | None  # result.json; None until training has finished.

  @classmethod
  def of(cls, workdir: str) -> History:
    run = workdirs.Workdir(workdir)
    rows = reporting.read_metrics(run.metrics) if storage.exists(run.metrics) else []
    return cls(workdir, rows, run.read_result())

  @property
  def evals(self) -> list[dict[str, float]]:
    """One row per evaluation: step, eval_loss, eval_accuracy, eval_top5_accuracy, eval_seconds."""
    return [r for r in self.rows if 'eval_loss' in r]

  @property
  def train(self) -> list[dict[str, float]]:
    """One row per report: step, train_loss, train_accuracy, learning_rate, ..."""
    return [r for r in self.rows if 'train_loss' in r]

  @property
  def stopped_early(self) -> bool:
    """Finished by `config.early_stopping_patience`."""
    return bool(self.result and self.result['stopped_early'])

  def plot(self):
    """Loss and accuracy against step (curves.png's figure), drawn by pyplot: shown in Jupyter."""
    from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top  # Only here.
    return reporting.curves_figure(self.rows, plt.figure(figsize=reporting.CURVES_SIZE))

  def __repr__(self) -> str:
    evals = self.evals
    last = (f', last at step {evals[-1]["step"]}: eval_accuracy={evals[-1]["eval_accuracy"]:.4f}'
            if evals else '')
    end = ('stopped early' if self.stopped_early else 'finished' if self.result
           else 'not finished')
    return f'History({self.workdir!r}: {len(evals)} evaluations{last}; {end})'


class ProgressBar:
  """`train_reports.Display` as a tqdm bar, updated at each report, and a line per evaluation.

  In Jupyter with ipywidgets the bar is a widget; without, tqdm's text bar,
  which a notebook's output also redraws in place.
  """

  def __init__(self):
    self._bar = None

  def train(self, step: int, total_steps: int, scalars: Mapping[str, float],
            speed: Mapping[str, float]) -> None:
    if self._bar is None:
      from tqdm import auto, std  # pylint: disable=g-import-not-at-top  # Only here.
      # tqdm.auto: the widget in Jupyter (and a warning without ipywidgets), else text.
      tqdm = auto.tqdm if _has_widgets() else std.tqdm
      self._bar = tqdm(total=total_steps, bar_format='{l_bar}{bar}| {n}/{total} steps '
                       '[{elapsed}{postfix}]')
    self._bar.update(step - self._bar.n)
    shown = f'loss={scalars["train_loss"]:.4f} accuracy={scalars["train_accuracy"]:.4f}'
    if speed.get('timed_steps'):  # No rate yet right after the compiling first step.
      eta = self._bar.format_interval(speed['eta_seconds'])
      shown += f' {speed["images_per_sec"]:.1f} img/s ETA {eta}'
    self._bar.set_postfix_str(shown)

  def evaluation(self, step: int, results: Mapping[str, float], seconds: float) -> None:
    from tqdm import std  # pylint: disable=g-import-not-at-top
    shown = ' '.join(f'{k}={v:.4f}' for k, v in results.items())
    std.tqdm.write(f'eval at step {step}: {shown} ({seconds:.1f} s)')

  def close(self, finished: bool) -> None:
    """Ends the bar: full when training finished, early stopping included; else left
    where the error stopped it (red in Jupyter)."""
    if self._bar is None:
      return
    if finished and self._bar.n < self._bar.total:  # Stopped early: the run ends here.
      self._bar.total = self._bar.n
      if hasattr(self._bar, 'container'):  # The widget's bar has a maximum of its own.
        self._bar.container.children[1].max = self._bar.n
      self._bar.set_description('stopped early')
    self._bar.close()


def _has_widgets() -> bool:
  return importlib.util.find_spec('ipywidgets') is not None


@contextlib.contextmanager
def _warnings_only() -> Iterator[None]:
  """absl's INFO lines (the CLI's log) off: the bar says it."""
  level = logging.get_verbosity()
  logging.set_verbosity(logging.WARNING)
  try:
    yield
  finally:
    logging.set_verbosity(level)


def fit(config: ml_collections.ConfigDict, workdir: str, *, progress: bool = True) -> History:
  """Trains `config` in `workdir` as `python -m vgg_flax.train` does, and returns its history.

  Resumes from the workdir's latest checkpoint; a finished run is not trained
  again. Evaluations, checkpoints (the best by `config.checkpoint.monitor`),
  early stopping and WORKDIR's files are the trainer's.

  Args:
    config: e.g. from `config_from`.
    workdir: the run folder, local or gs://.
    progress: a progress bar and a line per evaluation instead of absl's log
      lines; False leaves absl's logging as it is.

  Returns:
    The run's `History`.
  """
  bar = ProgressBar() if progress else None
  finished = False
  with _warnings_only() if progress else contextlib.nullcontext():
    try:
      train.train_and_evaluate(config, workdir, display=bar)
      finished = True
    finally:
      if bar is not None:
        bar.close(finished)
  return History.of(workdir)


def predict_image(workdir: str, path: str, top_k: int = 5,
                  checkpoint: str = 'best') -> list[tuple[str, float]]:
  """The `top_k` (class name, probability) of one image file, best first.

  As `python -m vgg_flax.predict --workdir=WORKDIR PATH`: the run's checkpoint,
  its class names and its evaluation's preprocessing.
  """
  with _warnings_only():
    return predict.predict(workdir, [path], top_k, checkpoint)[0]
