"""Any Keras VGG as a vgg_flax model: matched by layer order, not by name.

`convert_keras(path)` reads a `.keras`, whole-model `.h5`, `.weights.h5` or
legacy weights file (`keras_files`) and walks its layers in model order:

  Conv2D (3x3 or any odd square kernel, stride 1, 'same' padding) with a ReLU
    built in, or followed by [BatchNormalization and] ReLU / Activation('relu')
  MaxPooling2D 2x2 ('valid', or 'same' on an even size): ends a block
  after the fifth pooling: nothing (head 'none'), GlobalAverage/MaxPooling2D
    (head 'none' with `pooling`), or Flatten / global pooling and Dense layers:
    Dense layers after Flatten are the 'fc' head, after global average or max
    pooling the 'gap' head (`pooling='max'` for the latter), each with any
    number of hidden layers of any widths (`hidden_dims`; the paper's two of
    one width keep `fc_dim`, and one after pooling `gap_hidden_dim`).
  Dropout anywhere (an identity at inference; its rate becomes `dropout_rate`),
  InputLayer, and a softmax or linear output activation.

The blocks must form a column of the paper's Table 1 and their channels
scale as 1, 2, 4, 8, 8 times block 1's (`width`). Anything else stops with a
`WeightImportError` naming the first layer that does not fit and why, before
anything is returned. Keras BatchNormalization's epsilon (1e-3 by default)
differs from ours (1e-5): its moving variance is shifted by the difference
(`variance_for_epsilon`), which gives the same (var + eps). A file without a
model config cannot say its epsilon: Keras' default is assumed, as Keras
itself does, and `weights_export` writes such files for that default.

`from_keras(path, depth)` is the older importer by Keras Applications names.
"""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np

from vgg_flax.interop import architecture
from vgg_flax.interop import keras_files
from vgg_flax.interop import name_maps
from vgg_flax import models
from vgg_flax.runtime import errors

WeightImportError = errors.WeightImportError
BN_EPSILON = 1e-5  # Ours: layers.batch_norm's (torchvision's).
KERAS_BN_EPSILON = 1e-3  # Keras BatchNormalization's default: a weights-only file's.
_DROPOUTS = ('Dropout', 'SpatialDropout2D')
_HEAD_POOLS = {'Flatten': 'flatten', 'GlobalAveragePooling2D': 'avg',
               'GlobalMaxPooling2D': 'max'}


def read_keras(path) -> dict[str, np.ndarray]:
  """Every weight of a Keras file as `layer/kernel`, `layer/bias`, ... (any layout)."""
  return {f'{layer.name}/{kind}': value for layer in keras_files.read_layers(path).layers
          for kind, value in keras_files.weights_by_kind(layer).items()}


def variance_for_epsilon(var, epsilon: float, new_epsilon: float) -> np.ndarray:
  """The running variance that normalises with `new_epsilon` as `var` does with `epsilon`.

  BatchNorm divides by sqrt(var + epsilon), so var + epsilon - new_epsilon
  (summed in float64) gives the same denominator. A var under new_epsilon -
  epsilon gives a negative one, which inference handles exactly: only its sum
  with new_epsilon is used.
  """
  return (np.asarray(var, np.float64) + epsilon - new_epsilon).astype(np.float32)


def conv_layers(depth: int) -> list[str]:
  """Keras Applications' conv layer names of a VGG-`depth`."""
  cfg = models.CFGS[models.DEPTH_TO_VARIANT[depth]]
  return [f'block{b}_conv{i}' for b, kernels in enumerate(cfg, 1)
          for i in range(1, len(kernels) + 1)]


def keras_name_map(depth: int, include_top: bool = True) -> list[name_maps.Entry]:
  """The tensors of Keras' `VGG{depth}`, named `layer/kernel` and `layer/bias`."""
  name_maps.check_depth(depth)
  layers = conv_layers(depth) + (['fc1', 'fc2', 'predictions'] if include_top else [])
  # Keras Conv2D kernels are HWIO and Dense kernels (in, out), like Flax; its
  # Flatten is over NHWC like ours: every tensor is taken as it is.
  return [name_maps.as_is(f'{layer}/{kind}', 'params', (layer, kind))
          for layer in layers for kind in ('kernel', 'bias')]


def from_keras(h5_path, depth: int) -> dict[str, Any]:
  """Converts Keras Applications VGG16/VGG19 weights by their layer names.

  Returns:
    `{'params': ..., 'batch_stats': {}}` for `models.VGG(depth=depth,
    num_classes=N)` with top (N and the input size from the file), for
    `models.VGG(depth=depth, head='none')` without.
  """
  tensors = read_keras(h5_path)
  name_maps.check_depth(depth)
  include_top = any(k.startswith(('fc1/', 'fc2/', 'predictions/')) for k in tensors)
  last = tensors.get('predictions/kernel')
  num_classes = (int(np.shape(last)[-1]) if last is not None and np.ndim(last) == 2 else 1000
                 ) if include_top else None
  # Keras' Flatten sees the (S/32, S/32, 512) map of its input size S.
  fc1 = tensors.get('fc1/kernel')
  side = int(round(np.sqrt(np.shape(fc1)[0] / 512))) if include_top and np.ndim(fc1) == 2 else 7
  convs = sum(1 for k in tensors if re.fullmatch(r'block\d_conv\d/kernel', k))
  hint = (f' (the file has {convs} conv layers: VGG-{convs + 3})'
          if convs + 3 in models.DEPTH_TO_VARIANT and convs + 3 != depth else '')
  variables = name_maps.apply_name_map(
      tensors, keras_name_map(depth, include_top), depth=depth, batch_norm=False,
      num_classes=num_classes, origin=os.fspath(h5_path), hint=hint, image_size=32 * side)
  variables['batch_stats'] = {}
  return variables


def _fail(origin: str, layer: keras_files.Layer, why: str) -> WeightImportError:
  return WeightImportError(f'{origin}: layer {layer.name!r} ({layer.kind}) {why}')


def _check_conv(origin: str, layer: keras_files.Layer) -> None:
  cfg, kernel = layer.config or {}, layer.weights.get('kernel')
  shape = np.shape(kernel) if kernel is not None else ()
  if len(shape) == 4 and (shape[0] != shape[1] or shape[0] % 2 == 0):
    raise _fail(origin, layer, f'has a {shape[0]}x{shape[1]} kernel; vgg_flax has square '
                'kernels of odd size.')
  for field, fits in (('strides', lambda v: tuple(v) == (1, 1)),
                      ('padding', lambda v: v == 'same'),
                      ('dilation_rate', lambda v: tuple(v) == (1, 1)),
                      ('groups', lambda v: v == 1),
                      ('data_format', lambda v: v in (None, 'channels_last'))):
    if field in cfg and not fits(cfg[field]):
      raise _fail(origin, layer, f'has {field}={cfg[field]!r}; a VGG conv has strides 1, '
                  "padding 'same', no dilation, one group, channels last.")


def _walk_config(origin: str, kf: keras_files.KerasFile):
  """Blocks of (conv, bn) layers, the head pooling, dense layers and dropout rate."""
  blocks, head, denses, rate = [[]], None, [], None
  pending = None  # [conv, bn] waiting for its ReLU.
  size = kf.input_shape[0] if kf.input_shape else None
  pools = 0
  for layer in kf.layers:
    cfg = layer.config or {}
    kind = layer.kind
    act = cfg.get('activation', 'linear')
    if kind in ('ReLU', 'Activation'):
      if kind == 'ReLU':
        plain = (cfg.get('max_value') is None and not cfg.get('negative_slope')
                 and not cfg.get('threshold'))
        act = 'relu' if plain else 'leaky or clipped relu'
      if act == 'relu' and pending:
        pending = None
      elif act == 'relu' and denses and denses[-1][1] == 'linear':
        denses[-1][1] = 'relu'
      elif act in ('softmax', 'linear') and denses and denses[-1][1] == 'linear':
        denses[-1][1] = act
      else:
        raise _fail(origin, layer, f'({act}) has nothing to fit: vgg_flax has a ReLU after '
                    'every conv and hidden Dense layer, and a linear or softmax output.')
      continue
    if kind == 'Softmax' and denses:
      denses[-1][1] = 'softmax'
      continue
    if pending and kind != 'BatchNormalization':
      raise _fail(origin, pending[0], 'has no ReLU after it; every VGG conv has one.')
    if kind in _DROPOUTS:
      rate = cfg.get('rate', 0.5) if rate is None else rate
    elif kind == 'Conv2D':
      if head:
        raise _fail(origin, layer, f'comes after the head started ({head}); a VGG has '
                    'every conv in its five blocks.')
      _check_conv(origin, layer)
      if act not in ('relu', 'linear'):
        raise _fail(origin, layer, f'has activation {act!r}; VGG convs have a ReLU.')
      blocks[-1].append([layer, None])
      pending = blocks[-1][-1] if act == 'linear' else None
    elif kind == 'BatchNormalization':
      if not pending or pending[1] is not None or cfg.get('axis', -1) not in (-1, 3, [3], [-1]):
        raise _fail(origin, layer, 'is not between a conv without activation and its ReLU, '
                    "the only place vgg_flax's VGG has BatchNorm.")
      pending[1] = layer
    elif kind == 'MaxPooling2D':
      pool, strides = tuple(cfg.get('pool_size', (2, 2))), tuple(cfg.get('strides') or (2, 2))
      padding = cfg.get('padding', 'valid')
      if pool != (2, 2) or strides != (2, 2) or (
          padding == 'same' and (size is None or size % 2)):
        raise _fail(origin, layer, f'has pool_size {pool}, strides {strides}, padding '
                    f"{padding!r} on a {size}-pixel map; VGG pools 2x2 with stride 2 ('valid', "
                    "or 'same' on even sizes).")
      if not blocks[-1] or head:
        raise _fail(origin, layer, 'has no conv before it in its block; a VGG block is '
                    'convs then one pooling.')
      pools += 1
      size = size // 2 if size else size
      if pools < 5:
        blocks.append([])
      elif pools > 5:
        raise _fail(origin, layer, 'is a sixth pooling; a VGG has five.')
    elif kind in _HEAD_POOLS:
      if pools != 5 or head:
        raise _fail(origin, layer, f'comes after {pools} poolings; a VGG head comes after the '
                    'fifth.')
      head = _HEAD_POOLS[kind]
    elif kind == 'Dense':
      if not head:
        raise _fail(origin, layer, 'comes before Flatten or global pooling; a VGG head '
                    'flattens or pools the fifth block first.')
      if denses and denses[-1][1] != 'relu':
        raise _fail(origin, denses[-1][0], f'is followed by another Dense layer but has '
                    f'activation {denses[-1][1]!r}; hidden Dense layers need a ReLU.')
      denses.append([layer, act])
    else:
      raise _fail(origin, layer, 'is not a layer of a plain VGG (vgg_flax maps Conv2D, '
                  'BatchNormalization, ReLU, MaxPooling2D, Dropout, Flatten, global pooling '
                  'and Dense layers).')
  if pending:
    raise _fail(origin, pending[0], 'has no ReLU after it; every VGG conv has one.')
  if pools != 5:
    raise WeightImportError(f'{origin}: the model has {pools} MaxPooling2D layers; a VGG has '
                            'five, one after each block.')
  if denses and denses[-1][1] not in ('linear', 'softmax'):
    raise _fail(origin, denses[-1][0], f'has activation {denses[-1][1]!r}; the output of a '
                'VGG classifier is linear or softmax.')
  return blocks, head, denses, rate, size


def _walk_weights_only(origin: str, kf: keras_files.KerasFile, overrides: dict[str, Any]):
  """The same as `_walk_config` for files without a model config: from shapes only."""
  convs = [l for l in kf.layers if l.kind == 'Conv2D']
  norms = [l for l in kf.layers if l.kind == 'BatchNormalization']
  denses = [[l, 'relu'] for l in kf.layers if l.kind == 'Dense']
  for layer in kf.layers:
    if layer.kind == 'unknown':
      raise _fail(origin, layer, f'has weights {sorted(layer.weights)} of no Conv2D, '
                  'BatchNormalization or Dense layer.')
  if norms and len(norms) != len(convs):
    raise _fail(origin, norms[0], f'is one of {len(norms)} BatchNormalization layers for '
                f'{len(convs)} convs; a weights-only file fits only with one after every conv.')
  pairs = [[c, norms[i] if norms else None] for i, c in enumerate(convs)]
  channels = [np.shape(c.weights['kernel'])[3] for c in convs]
  width = channels[0] if channels else 0
  for name, cfg in models.CFGS.items():  # The column whose blocks fit the channels.
    counts = [len(c) for c in cfg]
    if name in models.LRN_VARIANTS or sum(counts) != len(convs):
      continue
    starts = np.cumsum([0] + counts)
    if all(architecture.block_channel_error(b + 1, channels[i], width) is None
           for b in range(5) for i in range(starts[b], starts[b + 1])):
      blocks = [pairs[starts[b]:starts[b + 1]] for b in range(5)]
      break
  else:
    raise WeightImportError(f'{origin}: {len(convs)} conv layers with channels {channels} fit '
                            'no VGG column (5 blocks of 1, 2, 4, 8, 8 times block 1\'s channels).')
  head = overrides.get('head')
  if not denses:
    head = 'none'
  elif head is None:  # A first Dense wider than the channels can only follow a Flatten.
    wide = np.shape(denses[0][0].weights['kernel'])[0] != channels[-1]
    head = 'flatten' if len(denses) == 3 or wide else 'avg'
  else:
    head = {'fc': 'flatten', 'gap': 'avg'}.get(head, head)
  for dense in denses[-1:]:
    dense[1] = 'linear'
  return blocks, head if denses else None, denses, None, None


def convert_keras(path, *, image_size: int | None = None, **overrides
                  ) -> tuple[models.VGG, dict[str, Any], dict[str, Any]]:
  """Any Keras VGG file as (model, variables, info); see the module docstring.

  Args:
    path: `.keras`, `.h5` (whole model or weights) or `.weights.h5`.
    image_size: the input side, for files without a model config.
    **overrides: `models.VGG` fields, e.g. `head='gap'` or `pooling='max'` for
      a weights-only file, or `conv_impl`; they must keep every shape.

  Returns:
    The model, `{'params', 'batch_stats'}` (float32 numpy) and info:
    'output' ('linear' or 'softmax'), 'image_size', 'in_channels'.

  Raises:
    WeightImportError: the first layer that does not fit, and why.
  """
  origin = os.fspath(path)
  kf = keras_files.read_layers(path)
  for layer in kf.layers:  # Keras 3 files without a config number their variables.
    layer.weights = keras_files.weights_by_kind(layer)
  if kf.has_config:
    blocks, head, denses, rate, final = _walk_config(origin, kf)
  else:
    blocks, head, denses, rate, final = _walk_weights_only(origin, kf, overrides)
  convs = [pair for block in blocks for pair in block]
  found = architecture.match_variant([[np.shape(c.weights['kernel'])[0] for c, _ in b]
                                 for b in blocks])
  if found is None:
    raise WeightImportError(f'{origin}: blocks of {[len(b) for b in blocks]} convs match no '
                            'VGG column (A: 1-1-2-2-2, B: 2-2-2-2-2, D: 2-2-3-3-3, E: 2-2-4-4-4).')
  width = np.shape(convs[0][0].weights['kernel'])[3]
  for b, block in enumerate(blocks, 1):
    for conv, _ in block:
      why = architecture.block_channel_error(b, np.shape(conv.weights['kernel'])[3], width)
      if why:
        raise _fail(origin, conv, why + '.')
  in_channels = int(np.shape(convs[0][0].weights['kernel'])[2])
  c5 = max(1, 512 * width // 64)
  input_side = kf.input_shape[0] if kf.input_shape else None
  if kf.input_shape and kf.input_shape[0] != kf.input_shape[1] and head == 'flatten':
    raise WeightImportError(f'{origin}: input shape {kf.input_shape} is not square; '
                            "vgg_flax's fc head is for square images.")
  kwargs = architecture.vgg_kwargs(*found) | {'width': int(width), 'batch_norm': any(
      bn is not None for _, bn in convs), 'dropout_rate': float(rate or 0.0)}
  side = final if final else None  # The map side after the fifth pooling, if known.
  hidden = [d for d, _ in denses[:-1]]
  if not denses:
    kwargs |= {'head': 'none', 'pooling': {'avg': 'avg', 'max': 'max'}.get(head, '')}
  else:
    fc1_in = np.shape(denses[0][0].weights['kernel'])[0]
    if side is None:
      side = int(round(np.sqrt(fc1_in / c5))) if head == 'flatten' else 1
    kwargs |= {'num_classes': int(np.shape(denses[-1][0].weights['kernel'])[1])}
    units = tuple(int(np.shape(d.weights['kernel'])[1]) for d in hidden)
    if head == 'flatten':  # The paper's two hidden layers of one width keep fc_dim.
      kwargs |= {'head': 'fc'} | ({'fc_dim': units[0]} if len(units) == 2 and
                                  units[0] == units[1] else {'hidden_dims': units})
    else:  # One hidden layer keeps gap_hidden_dim, as runs before hidden_dims had.
      kwargs |= {'head': 'gap', 'pooling': '' if head == 'avg' else head} | (
          {'gap_hidden_dim': units[0] if units else 0} if len(units) <= 1 else
          {'hidden_dims': units})
  if image_size is None:
    image_size = input_side or (32 * side if side else 224)
  kwargs |= overrides
  model = models.VGG(**kwargs)
  variables, owners = _variables(model, blocks, denses)
  _check_layer_shapes(origin, model, variables, owners, image_size, in_channels)
  info = {'output': denses[-1][1] if denses else 'features', 'image_size': int(image_size),
          'in_channels': in_channels}
  return model, variables, info


def _variables(model: models.VGG, blocks, denses):
  params, stats, owners = {}, {}, {}
  for b, block in enumerate(blocks, 1):
    for i, (conv, bn) in enumerate(block, 1):
      kernel = np.asarray(conv.weights['kernel'], np.float32)
      params[f'block{b}_conv{i}'] = {'kernel': kernel, 'bias': np.asarray(
          conv.weights.get('bias', np.zeros(kernel.shape[-1])), np.float32)}
      owners[f'block{b}_conv{i}'] = conv
      if bn is not None:
        w = keras_files.weights_by_kind(bn)
        eps = (bn.config or {}).get('epsilon', KERAS_BN_EPSILON)
        ones = np.ones(kernel.shape[-1], np.float32)
        params[f'block{b}_bn{i}'] = {'scale': np.asarray(w.get('gamma', ones), np.float32),
                                     'bias': np.asarray(w.get('beta', 0 * ones), np.float32)}
        stats[f'block{b}_bn{i}'] = {
            'mean': np.asarray(w['moving_mean'], np.float32),
            'var': variance_for_epsilon(w['moving_variance'], eps, BN_EPSILON)}
        owners[f'block{b}_bn{i}'] = bn
  names = [name for name, _ in model.hidden_layers()] + ['predictions'] * bool(denses)
  for name, (dense, _) in zip(names, denses):
    w = keras_files.weights_by_kind(dense)
    params[name] = {'kernel': np.asarray(w['kernel'], np.float32), 'bias': np.asarray(
        w.get('bias', np.zeros(np.shape(w['kernel'])[1])), np.float32)}
    owners[name] = dense
  return {'params': params, 'batch_stats': stats}, owners


def _check_layer_shapes(origin, model, variables, owners, image_size, in_channels) -> None:
  """Every variable against the model's own shapes; names the Keras layer."""
  mismatch = name_maps.shape_mismatch(model, variables, image_size, in_channels)
  if mismatch is None:
    return
  (_, path), want, have = mismatch
  layer = owners.get(path[0])
  who = f'layer {layer.name!r} ({layer.kind})' if layer else '/'.join(path)
  raise WeightImportError(
      f'{origin}: {who} gives {"/".join(path)} the shape {have}, but '
      f'{name_maps.describe(model)} with head {model.head!r} at {image_size} px expects '
      f'{want}; is the input size or an override different from the model\'s?')
