"""Checks a training run passes before it reads data or compiles anything.

`check_training_config` rejects configs that `config.validate` accepts but
training cannot use (a feature head, float16 without loss scaling, batches
that do not divide over the devices). `check_workdir` makes sure the workdir
can be written and, when it holds a run, that resuming it with this config
continues the same experiment: it refuses changes to what defines the run
(the model, the data and its order), warns about other training settings,
and says whether the optimiser state may be started afresh (another
`config.freeze`: the second stage of a fine-tune).
"""

from __future__ import annotations

import functools
import json
from typing import Any

from absl import logging
import jax
import ml_collections

from vgg_flax import config as config_lib
from vgg_flax.io import storage
from vgg_flax.io import workdirs
from vgg_flax import models
from vgg_flax.runtime import errors

# Changing these on resume would make the checkpoint another run: other data,
# another batch order (a function of seed, batch size and split), other shapes.
RUN_FIELDS = ('dataset', 'train_split', 'validation_split', 'image_size', 'batch_size', 'seed')
# Bookkeeping and numerics: free to change between launches, silently.
FREE_FIELDS = ('num_epochs', 'log_every_steps', 'eval_every_epochs', 'eval_batch_size',
               'early_stopping_patience', 'on_nonfinite', 'data_dir', 'eval_data_dir',
               'init_from', 'dont_load',
               'model.dtype', 'model.conv_impl', 'model.remat', 'input.cache',
               'input.uint8_transfer', 'profile_steps', 'state_sharding')
FREE_PREFIXES = ('checkpoint.', 'eval.', 'lease.', 'storage.')


def check_training_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError for a valid config that training cannot use."""
  m = config.model
  if m.head == 'none':
    raise errors.UsageError("config.model.head='none' outputs features, not class scores; "
                            "training needs 'fc' or 'gap' (use head='none' to extract features "
                            'from a trained model).')
  if m.dtype == 'float16':
    raise errors.UsageError("config.model.dtype='float16' is not allowed for training: float16 "
                            'gradients underflow without loss scaling; use \'bfloat16\' (the '
                            "same speed on GPU/TPU with float32's range) or 'float32'.")
  devices = jax.device_count()
  for field in ('batch_size', 'eval_batch_size'):
    if config[field] % devices:
      raise errors.UsageError(f'config.{field}={config[field]} does not divide over {devices} '
                              f'devices; use a multiple of {devices}.')
  per_device, k = config.batch_size // devices, config.grad_accum_steps
  if per_device % k:
    raise errors.UsageError(
        f'config.grad_accum_steps={k} does not divide the batch of each device '
        f'({config.batch_size} over {devices} devices: {per_device}); use a divisor of '
        f'{per_device}.')


def _flatten(tree: dict[str, Any], prefix: str = '') -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = tuple(v) if isinstance(v, list) else v
  return out


def changed_fields(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
  """The dotted config fields whose values differ between two config dicts (JSON form).

  A field the saved config lacks (it predates the field) counts as its
  default: a run saved before a field existed resumes as it was trained.
  """
  flat_saved, flat_current = _flatten(saved), _flatten(current)
  defaults = _defaults()
  return sorted(k for k in set(flat_saved) | set(flat_current)
                if flat_saved.get(k, defaults.get(k)) != flat_current.get(k))


@functools.cache
def _defaults() -> dict[str, Any]:
  return _flatten(json.loads(config_lib.get_base_config().to_json_best_effort()))


def describe_changes(saved: dict[str, Any], current: dict[str, Any], fields) -> str:
  """'field: old -> new, ...' for `fields` of two config dicts."""
  flat_saved, flat_current = _flatten(saved), _flatten(current)
  return ', '.join(f'{k}: {flat_saved.get(k)!r} -> {flat_current.get(k)!r}' for k in fields)


def is_free(field: str) -> bool:
  """True for bookkeeping fields that may change without changing the run."""
  return field in FREE_FIELDS or field.startswith(FREE_PREFIXES)


def _model_fields(saved: dict[str, Any], current: dict[str, Any]) -> set[str]:
  keys = set(saved) | set(current)
  fields = models.ARCHITECTURE_FIELDS.get(current.get('name'))
  if fields and saved.get('name') == current.get('name'):
    keys &= set(fields)  # E.g. a resnet50 ignores the VGG-only fields.
  # Numerics (the free fields), dropout and the initialiser do not change what a
  # checkpoint holds.
  return {f'model.{k}' for k in keys
          if k not in ('dropout_rate', 'init') and not is_free(f'model.{k}')}


def check_writable(workdir: str) -> None:
  """Raises OSError naming the workdir when a file cannot be created in it (a real
  probe file or object: on a bucket, permissions are only known by trying)."""
  storage.check_writable(workdir, probe=f'.write_test.{jax.process_index()}', subject='workdir',
                         hint='Checkpoints and metrics go there. Choose another --workdir.')


def check_workdir(workdir: str, config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """Fails before training when the workdir holds another run (after `check_writable`).

  Returns:
    The config fields that differ from the run saved in the workdir (empty for
    a new workdir); other training settings than before are logged as a warning.

  Raises:
    ValueError: the workdir holds a run of another model, dataset, image
      size, batch size or seed; the message names each field and both values.
  """
  run = workdirs.Workdir(workdir)
  if not run.has_config():
    return ()
  saved = run.read_config()
  current = json.loads(config.to_json_best_effort())
  changed = changed_fields(saved, current)
  fixed = _model_fields(saved.get('model', {}), current.get('model', {})) | set(RUN_FIELDS)

  def diffs(keys):
    return describe_changes(saved, current, keys)

  refused = [k for k in changed if k in fixed]
  if refused:
    kind = ('a run of a different model' if any(k.startswith('model.') for k in refused)
            else 'a run with other data or batches')
    raise ValueError(f'{workdir} holds {kind} ({diffs(refused)}); use a new --workdir or the '
                     'same config to resume.')
  noted = [k for k in changed if not k.startswith('model.') and not is_free(k)]
  if noted:
    logging.warning('Resuming %s with other training settings than before (%s).', workdir,
                    diffs(noted))
  return tuple(changed)


def check_disk_space(workdir: str, state: Any, copies: int = 3) -> None:
  """Fails before training when a few checkpoints of `state` would not fit."""
  need = copies * sum(x.nbytes for x in jax.tree.leaves(
      (state.params, state.opt_state, state.batch_stats)))
  free = storage.free_bytes(workdir)  # None on object storage: nothing to check.
  if free is not None and free < need:
    raise OSError(f'workdir {workdir} has {free / 2**20:.0f} MiB free; {copies} checkpoints of '
                  f'this model need {need / 2**20:.0f} MiB. Free some space or choose another '
                  '--workdir.')
