"""`vgg_flax.load`: any VGG, from anywhere, as (model, variables) in one call.

  model, variables = vgg_flax.load('runs/vgg16_digits')         # a training workdir
  model, variables = vgg_flax.load('weights/vgg16')             # python -m vgg_flax.convert
  model, variables = vgg_flax.load('vgg16-397923af.pth', image_size=32)  # torchvision
  model, variables = vgg_flax.load('tutorial.keras')            # any Keras VGG
  logits = model.apply(variables, images)                       # NHWC float32

The architecture comes from the run's config or off the file (see `weights`
and `keras_weights`); `overrides` set `models.VGG` fields the file cannot tell
(`head='gap'` for an ambiguous weights-only file) or that do not change a
parameter shape (`conv_impl`, `dtype`, `dropout_rate`). Paths go through
`vgg_flax.io.storage`, so gs:// works too.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from vgg_flax.interop import name_maps
from vgg_flax.interop import weights
from vgg_flax.io import run_config
from vgg_flax.io import storage
from vgg_flax.io import workdirs
from vgg_flax import models
from vgg_flax.runtime import errors

TORCH_SUFFIXES = ('.pth', '.pt', '.npz', '.bin')
KERAS_SUFFIXES = ('.keras', '.h5')
# models.VGG fields written to a converted folder's weights.json ('model').
MODEL_FIELDS = ('depth', 'variant', 'num_classes', 'kernel_size', 'batch_norm', 'dropout_rate',
                'head', 'pooling', 'fc_dim', 'gap_hidden_dim', 'hidden_dims', 'width')


class LoadError(errors.UsageError):
  """A path that holds no VGG vgg_flax can load, or an override that does not fit."""


def source_preset(source: str, model: models.VGG, in_channels: int) -> str:
  """The preprocessing (`config.input.preset`) a weight file's source trained with, or ''.

  The one place that decides it, for `load_with_info` and so for `convert`
  (weights.json) and `predict --weights` alike: 'torchvision' for torchvision
  files; 'caffe' for Keras Applications' ImageNet VGGs (width 64, no
  BatchNorm, 3 input channels, 1000 classes); '' (unknown) for other Keras
  VGGs, whose file does not say how their inputs were prepared.
  """
  if source == 'torchvision':
    return name_maps.PRESET['torchvision']
  if (source == 'keras' and model.width == 64 and not model.batch_norm and in_channels == 3
      and model.head != 'none' and model.num_classes == 1000):
    return name_maps.PRESET['keras']
  return ''


def model_fields(model: models.VGG) -> dict[str, Any]:
  """The JSON-able architecture of `model` (`models.VGG(**fields)` rebuilds it)."""
  return {f: getattr(model, f) for f in MODEL_FIELDS}


def load(path: storage.PathLike, *, checkpoint: str = 'best', image_size: int | None = None,
         **overrides) -> tuple[Any, dict[str, Any]]:
  """Loads a VGG and its variables from a workdir, a converted folder or a weights file.

  Args:
    path: a training workdir (its `checkpoint`), a folder written by
      `python -m vgg_flax.convert`, a torchvision `.pth`/`.pt`/`.npz`, or a
      Keras `.keras`, `.h5` or `.weights.h5`.
    checkpoint: 'best' or 'latest', for workdirs.
    image_size: torchvision files: the input side the 'fc' head is folded for
      (default 224); Keras weights-only files: the input side (default: what
      fc1 implies).
    **overrides: `models.VGG` fields (workdirs: `config.model` fields).

  Returns:
    `(model, variables)`: a `flax.linen` module and its float32 variables,
    ready for `model.apply(variables, images)`.

  Raises:
    LoadError: not a VGG source, or an override that changes a parameter shape.
    weights.WeightImportError: a file that does not fit, naming the tensor/layer.
  """
  model, variables, _ = load_with_info(path, checkpoint=checkpoint, image_size=image_size,
                                       **overrides)
  return model, variables


def load_with_info(path: storage.PathLike, *, checkpoint: str = 'best',
                   image_size: int | None = None, **overrides):
  """`load`, plus what the source says about its inputs and outputs.

  Returns:
    (model, variables, info): info has 'source' (torchvision, keras, workdir,
    converted), 'image_size', 'in_channels', 'preset' (the preprocessing of
    imported ImageNet weights, '' if unknown) and 'output' (logits, softmax).
  """
  root = storage.path(path)
  name = os.fspath(path)
  if storage.isdir(root / workdirs.CHECKPOINTS_DIR) or workdirs.Workdir(root).has_config():
    return _load_workdir(name, checkpoint, overrides)
  from vgg_flax.interop import transfer  # pylint: disable=g-import-not-at-top  # orbax: only here.
  if storage.isdir(root / transfer.CONVERTED_ITEM):
    meta = storage.read_json(root / transfer.CONVERTED_META)
    fields = meta.get('model') or _fields_of_old_meta(meta)
    model = _build(name, fields, overrides)
    variables = transfer.restore_checkpoint_variables(root / transfer.CONVERTED_ITEM)
    info = {'source': meta.get('source', 'converted'), 'preset': meta.get('preset', ''),
            'image_size': meta.get('image_size') or _fc_image_size(meta),
            'in_channels': meta.get('in_channels', 3), 'output': meta.get('output', 'logits')}
  elif storage.isfile(root) and name.endswith(TORCH_SUFFIXES):
    tensors, origin = weights.read_torchvision(name)
    image_size = image_size or name_maps.IMAGE_SIZE
    model, variables = weights.convert_torchvision(tensors, origin, image_size=image_size,
                                                   **overrides)
    in_channels = int(np.shape(variables['params']['block1_conv1']['kernel'])[2])
    info = {'source': 'torchvision', 'image_size': image_size, 'output': 'logits',
            'preset': source_preset('torchvision', model, in_channels),
            'in_channels': in_channels}
  elif storage.isfile(root) and name.endswith(KERAS_SUFFIXES):
    from vgg_flax.interop import keras_weights  # pylint: disable=g-import-not-at-top
    model, variables, info = keras_weights.convert_keras(name, image_size=image_size,
                                                         **overrides)
    info |= {'source': 'keras',
             'preset': source_preset('keras', model, info['in_channels'])}
  elif storage.exists(root):
    raise LoadError(f'{name} is not a training workdir, a folder written by python -m '
                    f'vgg_flax.convert, or a weights file ({", ".join(TORCH_SUFFIXES)} from '
                    'torchvision; .keras, .h5, .weights.h5 from Keras).')
  else:
    raise FileNotFoundError(f'{name} does not exist.')
  _check_shapes(name, model, variables, info, overrides)
  return model, {k: v for k, v in variables.items() if v}, info


def _load_workdir(workdir: str, checkpoint: str, overrides: dict[str, Any]):
  from vgg_flax.interop import transfer  # pylint: disable=g-import-not-at-top  # orbax: only here.
  config = run_config.load_config(workdir)
  for field, value in overrides.items():
    if field not in config.model:
      raise LoadError(f'{field}={value!r}: the run config has no model field {field!r}; '
                      f'its fields: {", ".join(config.model)}.')
    config.model[field] = value
  model, variables, _ = transfer.restore_model(workdir, config, checkpoint)
  dataset = workdirs.Workdir(workdir).read_dataset()
  info = {'source': 'workdir', 'preset': config.input.get('preset', ''), 'output': 'logits',
          'image_size': config.image_size, 'in_channels': dataset['num_channels'],
          'config': config, 'dataset': dataset}
  _check_shapes(workdir, model, variables, info, overrides)
  return model, {k: v for k, v in variables.items() if v}, info


def _fields_of_old_meta(meta: dict[str, Any]) -> dict[str, Any]:
  """The architecture of a folder converted before weights.json had 'model'."""
  fields = {'depth': meta['depth'], 'batch_norm': meta['batch_norm']}
  if meta.get('include_top'):
    return fields | {'num_classes': meta['num_classes']}
  return fields | {'head': 'none'}


def _fc_image_size(meta: dict[str, Any]) -> int:
  if not meta.get('fc1_inputs'):
    return name_maps.IMAGE_SIZE
  return 32 * int(round(np.sqrt(meta['fc1_inputs'] / 512)))


def _build(origin: str, fields: dict[str, Any], overrides: dict[str, Any]) -> models.VGG:
  unknown = sorted(set(overrides) - set(models.VGG.__dataclass_fields__))
  if unknown:
    raise LoadError(f'{origin}: {unknown[0]} is not a models.VGG field; overrides can set '
                    f'{", ".join(MODEL_FIELDS)}, conv_impl, dtype.')
  return models.VGG(**(dict(fields) | overrides))


def _check_shapes(origin: str, model, variables, info, overrides) -> None:
  """The variables must fit the model exactly: an override may not change a shape."""
  mismatch = name_maps.shape_mismatch(model, variables, info['image_size'] or name_maps.IMAGE_SIZE,
                                      info['in_channels'])
  if mismatch is None:
    return
  (collection, path), want, have = mismatch
  key = ''.join(f'[{k!r}]' for k in (collection, *path))  # As jax.tree_util.keystr writes it.
  cause = (f' (overrides: {", ".join(f"{k}={v!r}" for k, v in overrides.items())})'
           if overrides else '')
  raise LoadError(f'{origin}: the model{cause} expects {key} of shape {want}, the source has '
                  f'{have}; overrides may only change what keeps every parameter shape.')
