"""Reads every file Keras writes, without importing Keras: zipfile, json and h5py.

  .keras       Keras 3 `model.save`: a zip of config.json and model.weights.h5
  .h5          legacy whole model (`model.save('x.h5')`): a `model_config`
               attribute and the weights under `model_weights/`; or a legacy
               weights file (Keras 2 `save_weights`, the Keras Applications
               downloads): `layer_names` at the root
  .weights.h5  Keras 3 `save_weights`: `layers/<key>/vars/<i>`, the layer's
               name in the `name` attribute of `vars`

`read_layers` returns the model's layers in order, each with its class and
config when the file has the model config, and its weights by name. Nested
models (a `VGG16` base inside a `Sequential`) are flattened in place.

Without a config (weights-only files), layers are ordered by what the file
says: the legacy `layer_names` list, or in Keras 3 files by the numbered keys
Keras gives each class (`conv2d`, `conv2d_1`, ... `conv2d_12`: h5py lists them
alphabetically, so `conv2d_10` before `conv2d_2`), convolutions before dense
layers. Their class is guessed from the weights (a 4-D kernel: Conv2D, 2-D:
Dense, four vectors: BatchNormalization).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import zipfile
from typing import Any

import numpy as np

from vgg_flax.io import storage
from vgg_flax.runtime import errors

# The variables of a Keras 3 layer, in the order of `vars/<i>`.
_VAR_NAMES = {'Conv2D': ('kernel', 'bias'), 'Dense': ('kernel', 'bias'),
              'BatchNormalization': ('gamma', 'beta', 'moving_mean', 'moving_variance')}
_CONTAINERS = ('Sequential', 'Functional', 'Model')


@dataclasses.dataclass
class Layer:
  """One layer of a Keras model, in model order."""
  name: str
  kind: str  # Keras class name ('Conv2D', ...); guessed from the weights without a config.
  config: dict[str, Any] | None  # None: the file has no model config.
  weights: dict[str, np.ndarray]  # 'kernel', 'bias', 'gamma', ...


@dataclasses.dataclass
class KerasFile:
  layers: list[Layer]
  input_shape: tuple[int | None, ...] | None  # (H, W, C) from the config, if any.
  has_config: bool


def _text(value) -> str:
  return value.decode() if isinstance(value, bytes) else str(value)


def _natural(key: str) -> tuple:
  """'conv2d_10' after 'conv2d_2', 'conv2d' first."""
  m = re.fullmatch(r'(.*?)(?:_(\d+))?', key)
  return (m.group(1), int(m.group(2) or -1))


def read_layers(path) -> KerasFile:
  """The layers of a `.keras`, `.h5` or `.weights.h5` file (see module docstring).

  Raises:
    FileNotFoundError: no such file.
    errors.WeightImportError: not a file Keras writes, named with what it is.
  """
  import h5py  # pylint: disable=g-import-not-at-top  # Only the Keras import needs it.
  path = os.fspath(path)
  if not storage.exists(path):
    raise FileNotFoundError(f'Keras file {path} does not exist.')
  data = storage.read_bytes(path)
  config = None
  if data[:4] == b'PK\x03\x04':  # A .keras zip archive.
    try:
      with zipfile.ZipFile(io.BytesIO(data)) as archive:
        config = json.loads(archive.read('config.json'))
        data = archive.read('model.weights.h5')
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError) as e:
      raise errors.WeightImportError(f'{path} is not a readable .keras archive (it needs '
                                      f'config.json and model.weights.h5): {e}') from None
  try:
    f = h5py.File(io.BytesIO(data), 'r')
  except OSError as e:
    raise errors.WeightImportError(f'{path} is not a readable HDF5 file (truncated, or '
                                    f'another format?): {e}') from None
  with f:
    if config is None and 'model_config' in f.attrs:
      config = json.loads(_text(f.attrs['model_config']))
    by_name, order = _read_weights(f, path)
  if config is None:
    return KerasFile([Layer(n, _guess_kind(by_name[n]), None, by_name[n]) for n in order],
                     None, False)
  layers, input_shape = [], None
  for layer in _flatten(config):
    if layer['class_name'] == 'InputLayer':
      shape = layer['config'].get('batch_shape') or layer['config'].get('batch_input_shape')
      input_shape = input_shape or (tuple(shape[1:]) if shape else None)
      continue
    cfg = layer['config']
    shape = cfg.get('batch_input_shape') or cfg.get('batch_shape')  # Keras 2 Sequential.
    if shape and input_shape is None:
      input_shape = tuple(shape[1:])
    found = by_name.get(cfg['name'], {})
    names = _VAR_NAMES.get(layer['class_name'])
    if names and any(k.isdigit() for k in found):  # Keras 3: vars/0, 1, ...
      if layer['class_name'] == 'BatchNormalization':
        names = (('gamma',) * cfg.get('scale', True) + ('beta',) * cfg.get('center', True)
                 + ('moving_mean', 'moving_variance'))
      elif not cfg.get('use_bias', True):
        names = ('kernel',)
      found = {names[int(k)] if int(k) < len(names) else k: v for k, v in found.items()}
    layers.append(Layer(cfg['name'], layer['class_name'], cfg, found))
  return KerasFile(layers, input_shape, True)


def _read_weights(f, path: str) -> tuple[dict[str, dict[str, np.ndarray]], list[str]]:
  """{layer name: {weight name: array}} and the layer order the file gives."""
  group = f['model_weights'] if 'model_weights' in f else f
  by_name: dict[str, dict[str, np.ndarray]] = {}
  order: list[str] = []
  if 'layer_names' in group.attrs:  # Legacy: weight names like 'seq/conv2d/kernel:0'.
    for layer in group.attrs['layer_names']:
      layer = _text(layer)
      for weight in group[layer].attrs.get('weight_names', []):
        parts = _text(weight).split(':')[0].split('/')
        owner = parts[-2] if len(parts) > 1 else layer  # Nested models list their layers.
        if owner not in by_name:
          order.append(owner)
        by_name.setdefault(owner, {})[parts[-1]] = np.asarray(group[layer][_text(weight)])
    return by_name, order
  if 'layers' not in f:
    raise errors.WeightImportError(f'{path} is HDF5 but not a file Keras writes (no '
                                    'layer_names attribute, no model_weights or layers group).')
  convs, others = [], []

  def walk(node, prefix):
    for key in sorted(node['layers'], key=_natural) if 'layers' in node else ():
      child = node['layers'][key]
      if 'vars' in child and len(child['vars']):
        name = _text(child['vars'].attrs.get('name', key))
        by_name[name] = {k: np.asarray(v) for k, v in child['vars'].items()}
        (convs if by_name[name].get('0', np.zeros(())).ndim == 4 else others).append(name)
      walk(child, f'{prefix}{key}/')
  walk(f, '')
  return by_name, convs + others


def _guess_kind(found: dict[str, np.ndarray]) -> str:
  kernel = found.get('kernel', found.get('0'))
  if len(found) in (1, 2) and kernel is not None and kernel.ndim == 4:
    return 'Conv2D'
  if len(found) in (1, 2) and kernel is not None and kernel.ndim == 2:
    return 'Dense'
  if len(found) == 4 and all(a.ndim == 1 for a in found.values()):
    return 'BatchNormalization'
  return 'unknown'


def weights_by_kind(layer: Layer) -> dict[str, np.ndarray]:
  """The layer's weights under Keras' names, also for Keras 3 files without a config."""
  if layer.config is not None or not any(k.isdigit() for k in layer.weights):
    return layer.weights
  names = _VAR_NAMES.get(layer.kind, ())
  return {names[int(k)] if int(k) < len(names) else k: v for k, v in layer.weights.items()}


def _flatten(config: dict[str, Any]) -> list[dict[str, Any]]:
  """The layer configs of a (nested) model config, in order; checks that
  functional models are a chain (VGGs have no branches)."""
  if 'config' in config and config.get('class_name') in _CONTAINERS:
    inner = config['config']
  else:
    inner = config
  layers = []
  previous = None
  for layer in inner.get('layers', []):
    name = layer.get('name') or layer.get('config', {}).get('name')
    inbound = _inbound(layer.get('inbound_nodes'))
    if len(inbound) > 1:
      raise errors.WeightImportError(
          f"layer {name!r} ({layer['class_name']}) has {len(inbound)} inputs "
          f'({", ".join(inbound)}); a VGG is a chain of layers.')
    if inbound and previous is not None and inbound[0] != previous:
      raise errors.WeightImportError(
          f"layer {name!r} ({layer['class_name']}) takes the output of {inbound[0]!r}, not of "
          f'the layer before it ({previous!r}); a VGG is a chain of layers in order.')
    if layer['class_name'] in _CONTAINERS:
      layers += _flatten(layer)
    else:
      layers.append(layer)
    previous = name
  return layers


def _inbound(nodes) -> list[str]:
  """Names of the layers whose outputs feed this one (Keras 2 and 3 configs)."""
  names = []

  def walk(x):
    if isinstance(x, dict):
      if 'keras_history' in x.get('config', {}):
        names.append(x['config']['keras_history'][0])
        return
      for v in x.values():
        walk(v)
    elif isinstance(x, (list, tuple)):
      if len(x) >= 3 and isinstance(x[0], str) and isinstance(x[1], int):  # Keras 2.
        names.append(x[0])
        return
      for v in x:
        walk(v)
  walk(nodes or [])
  return names
