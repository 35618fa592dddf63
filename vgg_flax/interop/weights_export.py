"""Export a vgg_flax VGG to torchvision and Keras, with the import's name maps.

  python -m vgg_flax.convert --to=torchvision --input=runs/vgg16_digits --output=vgg16.pth
  python -m vgg_flax.convert --to=keras --input=runs/vgg16_digits --output=vgg16.weights.h5

torchvision: `to_torchvision` returns the state dict of torchvision's
`vggNN[_bn]` layout (`weights.torchvision_name_map` read backwards): OIHW
convs, BatchNorm running statistics with `num_batches_tracked`, and
`classifier.0` for the NCHW flatten of `AdaptiveAvgPool2d(7)`'s 7x7 map,
expanded from our fc1 for the model's input size (`torchvision_fc1_from`:
exact for 32 to 255 px). Only the 'fc' head exists there.

Keras: `keras_layers` lists the layers of the matching Keras model, named as
Keras Applications names them (for the 'fc' head at width 64 without
BatchNorm it *is* `keras.applications.VGG16/VGG19`), and `save_keras_weights`
writes them in Keras 3's `.weights.h5` layout with h5py, so Keras is not needed
to write them. `keras_model` builds that model when Keras is installed
(`.keras` and whole-model `.h5` files).

BatchNorm epsilon: a `.keras` or `.h5` model carries its config, so its
BatchNormalization layers get our epsilon (1e-5) and our variances, bit for
bit. A `.weights.h5` file carries no config, and every reader of one (Keras
building `BatchNormalization()`, `vgg_flax.load`) assumes Keras' default 1e-3;
so it is written for that epsilon, each moving variance shifted by 1e-5 - 1e-3
(`keras_weights.variance_for_epsilon`): the same var + eps, the same function
(to float32 rounding, about 1e-7), in Keras and back in vgg_flax. Variances
under 1e-3 are stored negative; only their sum with epsilon is ever used.

Only what the target can express is exported: the paper's A, B, D, E columns
with 3x3 kernels; anything else is refused naming the field.
"""

from __future__ import annotations

import io
import os
import re
from typing import Any

import numpy as np

from vgg_flax.interop import keras_weights
from vgg_flax.interop import weights
from vgg_flax.io import storage
from vgg_flax import models
from vgg_flax.runtime import errors

TARGETS = ('torchvision', 'keras')


class ExportError(errors.UsageError):
  """The model has something the target framework's VGG cannot express."""


def torchvision_fc1_from(kernel: np.ndarray, image_size: int) -> np.ndarray:
  """fc1's kernel for torchvision's 7x7 pooled map, from ours for `image_size`.

  The inverse of `weights.torchvision_fc1_for`: we need K7 with K7 o (P x P) = K, P
  the (7, s) AdaptiveAvgPool matrix of the s = image_size // 32 map. For
  s <= 7, P has full column rank, so K7 = K o (P+ x P+) with the left inverse
  P+ = pinv(P) is exact: 224 px (P = I), 32 px (the 1x1 map spread over 7x7)
  and every size in between. For s > 7 (256 px and up) pooling loses
  information and no K7 exists in general: refused.

  Args:
    kernel: our fc1 kernel, rows (h, w, c) over the (s, s, C) map.
    image_size: the input side the model runs at.

  Returns:
    The fc1 kernel for a (7, 7, C) map, rows (h, w, c), float32.

  Raises:
    weights.WeightImportError: image_size // 32 > 7.
  """
  side = image_size // 32
  if side > weights.TORCH_POOL:
    raise weights.WeightImportError(
        f'image_size={image_size}: torchvision pools the {side}x{side} feature map to 7x7 '
        'before classifier.0, which loses information; the fc head exports exactly for '
        'image_size 32 to 255 (maps of 1x1 to 7x7) only.')
  if side == weights.TORCH_POOL:  # P = I: the kernel as it is, bit for bit.
    return np.asarray(kernel, np.float32)
  channels = kernel.shape[0] // (side * side)
  pinv = np.linalg.pinv(weights.adaptive_pool_matrix(side))  # (side, 7); pinv @ P = I.
  kernel = np.asarray(kernel, np.float64).reshape(side, side, channels, -1)
  expanded = np.einsum('wj,iwco->ijco', pinv, np.einsum('hi,hwco->iwco', pinv, kernel))
  return expanded.reshape(weights.TORCH_POOL * weights.TORCH_POOL * channels, -1).astype(np.float32)


def check_exportable(model, target: str) -> None:
  """Raises ExportError naming the first field `target` cannot express."""
  if not isinstance(model, models.VGG):
    raise ExportError(f'model.name: only VGG models export to {target}, not '
                      f'{type(model).__name__}.')
  if model.cfg_name not in models.DEPTH_TO_VARIANT.values():
    raise ExportError(f'model.variant={model.cfg_name!r} has no {target} VGG; exported are the '
                      "columns A, B, D, E (depth 11, 13, 16, 19).")
  if model.kernel_size != 3:
    raise ExportError(f'model.kernel_size={model.kernel_size} has no {target} VGG (3x3 only).')
  if target == 'torchvision' and model.head != 'fc':
    raise ExportError(f"model.head={model.head!r} has no torchvision VGG: its classifier is "
                      "AdaptiveAvgPool2d(7) and three Linear layers (head 'fc').")
  if target == 'torchvision' and len(model.hidden_layers()) != 2:
    raise ExportError(f'model.hidden_dims={model.hidden_dims!r} has no torchvision VGG: its '
                      'classifier has two hidden Linear layers (classifier.0 and 3).')


def to_torchvision(model: models.VGG, variables: dict[str, Any], image_size: int
                   ) -> dict[str, np.ndarray]:
  """The torchvision-layout state dict (numpy) that gives `model`'s logits.

  Args:
    model: a VGG with the 'fc' head (`check_exportable`).
    variables: its {'params', 'batch_stats'}.
    image_size: the input side the model runs at (fc1's rows depend on it).

  Raises:
    ExportError: the model has no torchvision counterpart.
    weights.WeightImportError: an image size the fc head does not export at.
  """
  check_exportable(model, 'torchvision')
  params, stats = variables['params'], variables.get('batch_stats') or {}
  tree = {'params': dict(params), 'batch_stats': stats}
  tree['params']['fc1'] = dict(params['fc1'], kernel=torchvision_fc1_from(
      np.asarray(params['fc1']['kernel']), image_size))
  state = {}
  for e in weights.torchvision_name_map(0, model.batch_norm, variant=model.cfg_name):
    node = tree[e.collection]
    for key in e.path:
      node = node[key]
    to_source = e.to_source or np.asarray  # None: the same layout.
    state[e.source] = np.ascontiguousarray(to_source(np.asarray(node, np.float32)))
    if e.source.endswith('.running_var'):  # PyTorch counts its BN updates; 0 is harmless.
      state[e.source.replace('running_var', 'num_batches_tracked')] = np.array(0, np.int64)
  return state


def save_torchvision(state: dict[str, np.ndarray], path: str) -> None:
  """Writes a state dict as `.pth`/`.pt` (torch.save; needs torch) or `.npz`."""
  buffer = io.BytesIO()
  if path.endswith('.npz'):
    np.savez(buffer, **state)
  elif path.endswith(('.pth', '.pt')):
    try:
      import torch  # pylint: disable=g-import-not-at-top  # Only for .pth files.
    except ImportError:
      raise ImportError(f'writing {path} needs PyTorch (pip install torch); or write .npz '
                        'and load it with {k: torch.from_numpy(v) for k, v in '
                        'np.load(f).items()}.') from None
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, buffer)
  else:
    raise ExportError(f'--output={path}: a torchvision state dict is written as .pth, .pt '
                      'or .npz.')
  storage.write_bytes(path, buffer.getvalue())


def keras_layers(model: models.VGG, variables: dict[str, Any],
                 bn_epsilon: float = keras_weights.BN_EPSILON
                 ) -> list[tuple[str, str, dict, list]]:
  """(Keras class, layer name, config, weights) of the matching Keras model, in order.

  Args:
    model: a VGG `check_exportable` accepts.
    variables: its {'params', 'batch_stats'}.
    bn_epsilon: the BatchNormalization layers' epsilon; their moving variances
      are shifted so that they compute ours (see the module docstring).
  """
  check_exportable(model, 'keras')
  params, stats = variables['params'], variables.get('batch_stats') or {}
  out = []
  for b, kernels in enumerate(models.CFGS[model.cfg_name], 1):
    for i in range(1, len(kernels) + 1):
      conv = params[f'block{b}_conv{i}']
      out.append(('Conv2D', f'block{b}_conv{i}', {
          'filters': int(np.shape(conv['kernel'])[3]), 'kernel_size': 3, 'padding': 'same',
          'activation': 'linear' if model.batch_norm else 'relu'}, [conv['kernel'], conv['bias']]))
      if model.batch_norm:
        bn, s = params[f'block{b}_bn{i}'], stats[f'block{b}_bn{i}']
        var = keras_weights.variance_for_epsilon(s['var'], keras_weights.BN_EPSILON, bn_epsilon)
        out.append(('BatchNormalization', f'block{b}_bn{i}',
                    {'epsilon': bn_epsilon, 'momentum': 0.9},
                    [bn['scale'], bn['bias'], s['mean'], var]))
        out.append(('Activation', f'block{b}_relu{i}', {'activation': 'relu'}, []))
    out.append(('MaxPooling2D', f'block{b}_pool', {'pool_size': 2, 'strides': 2}, []))
  dense = lambda name, act: ('Dense', name, {'units': int(np.shape(params[name]['kernel'])[1]),
                                             'activation': act},
                             [params[name]['kernel'], params[name]['bias']])
  if model.head != 'none':
    pool = model.pooling or 'avg'
    out.append(('Flatten', 'flatten', {}, []) if model.head == 'fc' else (
        {'avg': 'GlobalAveragePooling2D', 'max': 'GlobalMaxPooling2D'}[pool], f'{pool}_pool',
        {}, []))
    out += [dense(name, 'relu') for name, _ in model.hidden_layers()]
    out.append(dense('predictions', 'linear'))
  elif model.pooling:
    cls = {'avg': 'GlobalAveragePooling2D', 'max': 'GlobalMaxPooling2D'}[model.pooling]
    out.append((cls, f'{model.pooling}_pool', {}, []))
  return [(c, n, cfg, [np.asarray(w, np.float32) for w in ws]) for c, n, cfg, ws in out]


def _snake(name: str) -> str:
  """Keras' class-name keys: 'Conv2D' -> 'conv2d', 'MaxPooling2D' -> 'max_pooling2d'."""
  return re.sub(r'(?<=[a-z0-9])(?=[A-Z])', '_', name).lower().replace('2_d', '2d')


def save_keras_weights(model: models.VGG, variables: dict[str, Any], path: str) -> None:
  """Writes Keras 3's `.weights.h5` for the model of `keras_layers` (h5py only).

  Keras keys each layer by its class, numbered in model order (`conv2d`,
  `conv2d_1`, ...), and names it in the `name` attribute of `vars`. The file
  has no config: BatchNorm is written for Keras' default epsilon (module
  docstring).
  """
  import h5py  # pylint: disable=g-import-not-at-top
  if not path.endswith('.weights.h5'):
    raise ExportError(f'--output={path}: Keras weights are written as .weights.h5 (or a whole '
                      'model as .keras or .h5).')
  buffer, counts = io.BytesIO(), {}
  with h5py.File(buffer, 'w') as f:
    layers = f.create_group('layers')
    for cls, name, _, arrays in [('InputLayer', 'input_layer', {}, [])] + keras_layers(
        model, variables, keras_weights.KERAS_BN_EPSILON):
      key = _snake(cls)
      counts[key] = counts.get(key, -1) + 1
      group = layers.create_group(key + (f'_{counts[key]}' if counts[key] else ''))
      group_vars = group.create_group('vars')
      group_vars.attrs['name'] = name
      for i, array in enumerate(arrays):
        group_vars.create_dataset(str(i), data=array)
    f.create_group('vars').attrs['name'] = keras_model_name(model)
  storage.write_bytes(path, buffer.getvalue())


def keras_model_name(model: models.VGG) -> str:
  return f'vgg{model.depth if not model.variant else model.cfg_name.lower()}'


def keras_model(model: models.VGG, variables: dict[str, Any], input_shape: tuple[int, int, int]):
  """The Keras model of `keras_layers`, with the weights set (needs Keras)."""
  import keras  # pylint: disable=g-import-not-at-top  # Optional: whole models only.
  inputs = keras.Input(input_shape, name='input_layer')
  x = inputs
  for cls, name, cfg, arrays in keras_layers(model, variables):
    layer = getattr(keras.layers, cls)(name=name, **cfg)
    x = layer(x)
    if arrays:
      layer.set_weights(arrays)
  return keras.Model(inputs, x, name=keras_model_name(model))


def save_keras_model(model: models.VGG, variables: dict[str, Any], path: str,
                     input_shape: tuple[int, int, int]) -> None:
  """Writes a whole Keras model (`.keras`, or legacy HDF5 `.h5`) through storage; needs Keras."""
  import tempfile  # pylint: disable=g-import-not-at-top
  if path.endswith('.weights.h5') or not path.endswith(('.keras', '.h5')):
    raise ExportError(f'--output={path}: a whole Keras model is written as .keras or .h5 '
                      '(or its weights alone as .weights.h5).')
  try:
    built = keras_model(model, variables, input_shape)
  except ImportError:
    raise ImportError(f'writing {path} needs Keras (pip install keras); or write '
                      '.weights.h5, which needs only h5py.') from None
  with tempfile.TemporaryDirectory() as tmp:
    local = os.path.join(tmp, 'model' + os.path.splitext(path)[1])  # Keras picks the format.
    built.save(local)
    with open(local, 'rb') as f:  # Our own temporary file, not a user path.
      storage.write_bytes(path, f.read())
