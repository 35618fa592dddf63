"""The run folder (`--workdir`): every file a run keeps there, named once, local or gs://.

  WORKDIR/
    config.json        the run's full config (written when training starts)
    dataset.json       class names, channels, the model's number of classes, the
                       normalisation constants (mean, std), eval_files_sha256
    metrics.jsonl      one JSON object per line: step and scalars
    events.out.tfevents.*  the same scalars for TensorBoard
    curves.png         loss and accuracy curves
    checkpoints/latest/<step>/, checkpoints/best/<step>/   orbax checkpoints
    result.json        written once training has finished (the sweeps' signal)
    lease.json         while a trainer holds the workdir
    train.log          a sweep run's output, one section per attempt
    plugins/profile/<run>/   config.profile_steps' trace (TensorBoard's profile tab)

The trainer, evaluate, predict, load, the sweeps and the lease all reach these
files through `Workdir`, so that the layout has one owner.
"""

from __future__ import annotations

from typing import Any

from etils import epath

from vgg_flax.io import storage

CONFIG_FILE = 'config.json'
DATASET_FILE = 'dataset.json'
METRICS_FILE = 'metrics.jsonl'
CURVES_FILE = 'curves.png'
RESULT_FILE = 'result.json'
LEASE_FILE = 'lease.json'
LOG_FILE = 'train.log'
PROFILE_DIR = 'plugins/profile'  # Where TensorBoard's profile plugin looks.
CHECKPOINTS_DIR = 'checkpoints'
CHECKPOINT_KINDS = ('latest', 'best')

# How to get a lost bookkeeping file back.
_REWRITTEN_AT_START = ('training writes it at every start: run the training command on this '
                       'workdir again (it resumes, or stops at once if finished) to rewrite it')


class Workdir:
  """A run folder: the paths of its files, and readers for the JSON ones."""

  def __init__(self, path: storage.PathLike):
    self.name = str(path)  # As the user wrote it, for messages.
    self.path: epath.Path = storage.path(path)

  def __str__(self) -> str:
    return self.name

  def __repr__(self) -> str:
    return f'Workdir({self.name!r})'

  @property
  def config(self) -> epath.Path:
    return self.path / CONFIG_FILE

  @property
  def dataset(self) -> epath.Path:
    return self.path / DATASET_FILE

  @property
  def metrics(self) -> epath.Path:
    return self.path / METRICS_FILE

  @property
  def curves(self) -> epath.Path:
    return self.path / CURVES_FILE

  @property
  def result(self) -> epath.Path:
    return self.path / RESULT_FILE

  @property
  def lease(self) -> epath.Path:
    return self.path / LEASE_FILE

  @property
  def log(self) -> epath.Path:
    return self.path / LOG_FILE

  @property
  def profile(self) -> epath.Path:
    return self.path / PROFILE_DIR

  def checkpoints(self, kind: str = 'latest') -> epath.Path:
    """checkpoints/latest (the newest few) or checkpoints/best (the best one)."""
    if kind not in CHECKPOINT_KINDS:
      raise ValueError(f'checkpoint kind {kind!r} is not allowed: expected one of '
                       f'{", ".join(map(repr, CHECKPOINT_KINDS))}.')
    return self.path / CHECKPOINTS_DIR / kind

  def has_config(self) -> bool:
    return storage.exists(self.config)

  def read_config(self) -> dict[str, Any]:
    """config.json as a dict; FileNotFoundError naming the file when it is missing."""
    if not storage.exists(self.config):
      raise FileNotFoundError(f'{self.config} does not exist: is {self.name} a vgg_flax training '
                              'workdir?')
    return storage.read_json(self.config, "it records the run's config: restore it from a copy "
                             'of the run, or use another --workdir')

  def read_dataset(self) -> dict[str, Any]:
    """dataset.json: class names, channels and the model's number of classes."""
    if not storage.exists(self.dataset):
      raise FileNotFoundError(f'{self.dataset} does not exist; it is written when training '
                              'starts.')
    return storage.read_json(self.dataset, _REWRITTEN_AT_START)

  def read_result(self) -> dict[str, Any] | None:
    """result.json, or None before the run has finished."""
    if not storage.exists(self.result):
      return None
    return storage.read_json(self.result, 'delete it: the run then resumes from its last '
                             'checkpoint and writes it again')
