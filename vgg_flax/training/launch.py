"""What one launch of a training run knows before its first step, and how it is built.

`set_up` reads the dataset's description, counts the steps, builds the mesh,
the model, the optimiser and the initial state, and opens the checkpoints;
`vgg_flax.train` then restores or initialises and runs the steps.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from absl import logging
import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections

from vgg_flax.data import input_pipeline
from vgg_flax.io import workdirs
from vgg_flax.models import flops
from vgg_flax.runtime import errors
from vgg_flax.training import checkpoint
from vgg_flax.training import preflight
from vgg_flax.training import step as step_lib


@dataclasses.dataclass(frozen=True)
class Setup:
  """What one launch of a training run knows before its first step."""
  config: ml_collections.ConfigDict
  workdir: str
  builder: Any
  info: input_pipeline.DatasetInfo
  num_classes: int
  steps_per_epoch: int
  total_steps: int
  mesh: jax.sharding.Mesh
  model: Any
  learning_rate_fn: Any
  flops_per_image: float
  peak_flops: float
  ckpt: checkpoint.Checkpointer

  @property
  def run(self) -> workdirs.Workdir:
    return workdirs.Workdir(self.workdir)

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  @property
  def data_sharding(self) -> NamedSharding:
    return NamedSharding(self.mesh, P('data'))


def set_up(config: ml_collections.ConfigDict, workdir: str) -> tuple[Setup, step_lib.TrainState]:
  """Data info, step counts, the model and optimiser, the checkpointer, the initial state.

  Raises:
    ValueError: fewer model outputs than the dataset has classes.
    errors.UsageError: `workdir` holds a run trained past this config's last step.
  """
  builder = input_pipeline.get_builder(config)
  info = input_pipeline.dataset_info(config, builder)
  num_classes = config.model.num_classes or info.num_classes
  if num_classes < info.num_classes:
    raise ValueError(f'config.model.num_classes={num_classes} but {info.name} has '
                     f'{info.num_classes} classes; leave it unset to take the dataset\'s.')
  steps_per_epoch = input_pipeline.steps_per_epoch(config, info)
  total_steps = config.num_epochs * steps_per_epoch
  ckpt = checkpoint.Checkpointer(workdir, keep=config.checkpoint.keep)
  _refuse_a_shorter_run(workdir, config, ckpt, steps_per_epoch, total_steps)
  mesh = step_lib.create_mesh()
  model, tx, learning_rate_fn = step_lib.create_model_and_optimizer(config, num_classes,
                                                                    steps_per_epoch)
  flops_per_image = flops.train_flops(model, config.image_size, info.num_channels)
  peak_flops, peak_source = flops.device_peak_flops()
  logging.info('%.2f GFLOP per training image; peak %.0f GFLOP/s per device (%s).',
               flops_per_image / 1e9, peak_flops / 1e9, peak_source)
  setup = Setup(config, workdir, builder, info, num_classes, steps_per_epoch, total_steps, mesh,
                model, learning_rate_fn, flops_per_image, peak_flops, ckpt)
  state = step_lib.create_train_state(model, tx, config, info.num_channels, setup.replicated)
  preflight.check_disk_space(workdir, state)
  return setup, state


def _refuse_a_shorter_run(workdir: str, config: ml_collections.ConfigDict,
                          ckpt: checkpoint.Checkpointer, steps_per_epoch: int,
                          total_steps: int) -> None:
  """Fewer epochs than a run was trained for would relabel its results as this config's."""
  latest = ckpt.latest_step()
  if latest is not None and latest > total_steps:
    needed = -(-latest // steps_per_epoch)
    raise errors.UsageError(
        f'{workdir} holds a run trained to step {latest}; config.num_epochs={config.num_epochs} '
        f'ends at step {total_steps}. Use a new --workdir, or num_epochs >= {needed} to continue '
        'that run.')
