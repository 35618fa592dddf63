"""The torchvision importer: state dicts and files in, vgg_flax variables out.

`from_torchvision` returns the Flax variables `{'params': ..., 'batch_stats':
...}` of `models.VGG(depth, batch_norm, num_classes)` with the 'fc' head, as
float32 numpy arrays, through the explicit name map `torchvision_name_map`
checked tensor by tensor (`name_maps`, which the Keras importer
`keras_weights` shares): a missing, extra or mis-shaped tensor raises
`WeightImportError` naming it.

torchvision layout (`torchvision.models.vgg16(...).state_dict()`):
  features.N.{weight,bias}          conv, OIHW; N counts every conv, BN, ReLU, pool
  features.N.{weight,bias,running_mean,running_var,num_batches_tracked}  BN (_bn)
  classifier.{0,3,6}.{weight,bias}  Linear, (out, in); classifier.0 after
                                     AdaptiveAvgPool2d(7) + an NCHW flatten

Runtime code never imports torch: `.pth`/`.pt` files need it (imported lazily);
state dicts of arrays and `.npz` files do not. `torchvision_architecture` reads
a whole VGG off a state dict (column, BatchNorm, channels, input channels, FC
widths, classes); `weights_export` writes the other way with the same maps.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from vgg_flax.interop import architecture
from vgg_flax.interop import name_maps
from vgg_flax.io import storage
from vgg_flax import models
from vgg_flax.runtime.errors import WeightImportError

# torchvision's classifier sees AdaptiveAvgPool2d((7, 7)) of 512 channels.
TORCH_POOL = 7


def _oihw_to_hwio(w):
  # PyTorch Conv2d weight (out, in, kh, kw) -> Flax/lax conv kernel (kh, kw, in, out).
  return np.transpose(w, (2, 3, 1, 0))


def _hwio_to_oihw(w):
  return np.transpose(w, (3, 2, 0, 1))


def _hwio_to_oihw_shape(shape):
  h, w, i, o = shape
  return (o, i, h, w)


def _linear_to_dense(w):
  # PyTorch Linear weight (out, in) -> Flax Dense kernel (in, out).
  return np.transpose(w)


def _dense_to_linear_shape(shape):
  return tuple(reversed(shape))


def _torch_fc1_to_dense(w):
  # classifier.0 sees torch.flatten of an NCHW (512, 7, 7) map: input index
  # c*49 + h*7 + w. Our fc1 sees the NHWC (7, 7, 512) map flattened: index
  # (h*7 + w)*512 + c. Split the input axis into (C, H, W), move it to (H, W, C),
  # then transpose (out, in) -> (in, out).
  out_features, in_features = w.shape
  channels = in_features // (TORCH_POOL * TORCH_POOL)
  w = w.reshape(out_features, channels, TORCH_POOL, TORCH_POOL)
  return np.transpose(w, (2, 3, 1, 0)).reshape(in_features, out_features)


def _dense_to_torch_fc1(w):
  # The inverse of _torch_fc1_to_dense: rows (h, w, c) of the 7x7 map -> columns (c, h, w).
  in_features, out_features = w.shape
  channels = in_features // (TORCH_POOL * TORCH_POOL)
  w = w.reshape(TORCH_POOL, TORCH_POOL, channels, out_features)
  return np.transpose(w, (3, 2, 0, 1)).reshape(out_features, in_features)


def torchvision_name_map(depth: int, batch_norm: bool = False, *, variant: str = '',
                         include_top: bool = True) -> list[name_maps.Entry]:
  """The tensors of torchvision's `vgg{depth}[_bn]`, in `state_dict` order.

  `variant` (a column of `models.CFGS`) wins over `depth`, for torchvision-layout
  models of another column; `include_top=False` leaves out the classifier.
  """
  if not variant:
    name_maps.check_depth(depth)
  entries = []
  index = 0  # features.N counts every module of torchvision's nn.Sequential.
  cfg = models.CFGS[variant or models.DEPTH_TO_VARIANT[depth]]
  for b, kernels in enumerate(cfg, 1):
    for i in range(1, len(kernels) + 1):
      conv = f'block{b}_conv{i}'
      entries += [
          name_maps.Entry(f'features.{index}.weight', 'params', (conv, 'kernel'), _oihw_to_hwio,
                          _hwio_to_oihw_shape, _hwio_to_oihw),
          name_maps.as_is(f'features.{index}.bias', 'params', (conv, 'bias'))]
      index += 1
      if batch_norm:
        bn = f'block{b}_bn{i}'
        entries += [  # Same epsilon (1e-5) in both; momentum only matters in training.
            name_maps.as_is(f'features.{index}.weight', 'params', (bn, 'scale')),
            name_maps.as_is(f'features.{index}.bias', 'params', (bn, 'bias')),
            name_maps.as_is(f'features.{index}.running_mean', 'batch_stats', (bn, 'mean')),
            name_maps.as_is(f'features.{index}.running_var', 'batch_stats', (bn, 'var'))]
        index += 1
      index += 1  # ReLU.
    index += 1  # MaxPool2d.
  if not include_top:
    return entries
  # classifier: 0 Linear, 1 ReLU, 2 Dropout, 3 Linear, 4 ReLU, 5 Dropout, 6 Linear.
  entries += [
      name_maps.Entry('classifier.0.weight', 'params', ('fc1', 'kernel'), _torch_fc1_to_dense,
                      _dense_to_linear_shape, _dense_to_torch_fc1),
      name_maps.as_is('classifier.0.bias', 'params', ('fc1', 'bias'))]
  for index, name in ((3, 'fc2'), (6, 'predictions')):
    entries += [
        name_maps.Entry(f'classifier.{index}.weight', 'params', (name, 'kernel'),
                        _linear_to_dense, _dense_to_linear_shape, _linear_to_dense),
        name_maps.as_is(f'classifier.{index}.bias', 'params', (name, 'bias'))]
  return entries


@contextlib.contextmanager
def _readable(path: str):
  """`path` itself for local files; an open file object for objects in a bucket."""
  if not storage.is_remote(path):
    yield path
    return
  with storage.open_file(path, 'rb') as f:
    yield f


def _to_numpy(value) -> np.ndarray:
  if hasattr(value, 'detach'):  # A torch.Tensor, without importing torch.
    value = value.detach().cpu()
  if hasattr(value, 'numpy'):
    return value.numpy()
  return np.asarray(value)


def read_torchvision(state_dict_or_path) -> tuple[dict[str, np.ndarray], str]:
  """A torchvision state dict as numpy arrays, from a mapping or a .pth/.pt/.npz file."""
  if isinstance(state_dict_or_path, Mapping):
    return {k: _to_numpy(v) for k, v in state_dict_or_path.items()}, 'state_dict'
  path = os.fspath(state_dict_or_path)
  if not storage.exists(path):
    raise FileNotFoundError(f'torchvision weights file {path} does not exist.')
  if path.endswith('.npz'):
    with _readable(path) as source, np.load(source, allow_pickle=False) as f:
      return {k: f[k] for k in f.files}, path
  if path.endswith(('.pth', '.pt', '.bin')):
    try:
      import torch  # pylint: disable=g-import-not-at-top  # Only for .pth files.
    except ImportError:
      raise ImportError(f'reading {path} needs PyTorch (pip install torch); or save the '
                        'state dict as .npz: np.savez(f, **{k: v.numpy() for k, v in '
                        'sd.items()})') from None
    try:
      with _readable(path) as source:
        loaded = torch.load(source, map_location='cpu', weights_only=True)
    except Exception as e:  # pylint: disable=broad-except
      raise WeightImportError(f'{path} is not a readable PyTorch file: {e}') from None
    if isinstance(loaded, Mapping) and 'state_dict' in loaded:  # Training checkpoints.
      loaded = loaded['state_dict']
    if not isinstance(loaded, Mapping):
      raise WeightImportError(f'{path} holds a {type(loaded).__name__}, not a state dict.')
    return {k: _to_numpy(v) for k, v in loaded.items()}, path
  raise WeightImportError(f'{path}: unknown torchvision weights format; expected a .pth, '
                          '.pt or .npz file, or a state dict.')


def _is_counter(name: str) -> bool:
  # BatchNorm's num_batches_tracked: PyTorch's count of updates, not a weight.
  return name.endswith('.num_batches_tracked')


def infer_torchvision(tensors: Mapping[str, np.ndarray]) -> tuple[int, bool]:
  """(depth, batch_norm) from the conv and BN tensors of a torchvision state dict."""
  convs = [k for k, v in tensors.items() if re.fullmatch(r'features\.\d+\.weight', k)
           and np.ndim(v) == 4]
  batch_norm = any(k.endswith('.running_mean') for k in tensors)
  depth = len(convs) + 3
  if depth not in models.DEPTH_TO_VARIANT:
    raise WeightImportError(f'found {len(convs)} conv layers (features.N.weight); '
                            'a torchvision VGG-11/13/16/19 has 8/10/13/16.')
  return depth, batch_norm


def from_torchvision(state_dict_or_path, depth: int, batch_norm: bool = False) -> dict[str, Any]:
  """Converts a torchvision VGG `state_dict` into vgg_flax variables.

  Args:
    state_dict_or_path: a mapping name -> array-like (torch tensors work), or a
      path to a `.pth`/`.pt` (needs torch) or `.npz` file.
    depth: 11, 13, 16 or 19.
    batch_norm: the `_bn` variants; their running statistics go to 'batch_stats'.

  Returns:
    `{'params': ..., 'batch_stats': ...}` (float32 numpy) for
    `models.VGG(depth=depth, batch_norm=batch_norm, num_classes=N)`, N from
    `classifier.6`; the 'fc' head is for 224 px inputs.

  Raises:
    WeightImportError: a missing, unexpected or mis-shaped tensor (named).
  """
  tensors, origin = read_torchvision(state_dict_or_path)
  name_maps.check_depth(depth)
  last = tensors.get('classifier.6.weight')
  num_classes = int(np.shape(last)[0]) if last is not None and np.ndim(last) == 2 else 1000
  hint = ''
  try:
    found_depth, found_bn = infer_torchvision(tensors)
    if (found_depth, found_bn) != (depth, batch_norm):
      looks_like = models.VGG(depth=found_depth, batch_norm=found_bn)
      hint = f' (the file looks like {name_maps.describe(looks_like)})'
  except WeightImportError:
    pass
  variables = name_maps.apply_name_map(
      tensors, torchvision_name_map(depth, batch_norm), depth=depth, batch_norm=batch_norm,
      num_classes=num_classes, origin=origin, ignore=_is_counter, hint=hint)
  variables.setdefault('batch_stats', {})
  return variables


def adaptive_pool_matrix(in_size: int, out_size: int = TORCH_POOL) -> np.ndarray:
  """(out_size, in_size) matrix of torch's AdaptiveAvgPool1d (its bin edges)."""
  m = np.zeros((out_size, in_size), np.float64)
  for i in range(out_size):
    start, end = (i * in_size) // out_size, -(-((i + 1) * in_size) // out_size)
    m[i, start:end] = 1.0 / (end - start)
  return m


def torchvision_fc1_for(variables: dict[str, Any], image_size: int) -> dict[str, Any]:
  """Folds torchvision's AdaptiveAvgPool2d(7) into fc1 for another input size.

  torchvision pools any feature map to 7x7 before classifier.0; our 'fc' head
  flattens the map as it is. The pooling is linear, so fc1 for an (h, w) map
  is sum_ij P[i, h] P[j, w] K[i, j]: the same logits as torchvision at
  `image_size` (at 224 it is the identity; at 32 the 1x1 map is replicated).

  Args:
    variables: from `from_torchvision` (fc1 kernel for 7x7x512 inputs).
    image_size: the input side the model will see.

  Returns:
    A copy of `variables` whose fc1 kernel has (image_size // 32)**2 * 512 rows.
  """
  side = image_size // 32
  kernel = np.asarray(variables['params']['fc1']['kernel'])
  channels = kernel.shape[0] // (TORCH_POOL * TORCH_POOL)
  # Rows are (h, w, c) over the 7x7 map (see _torch_fc1_to_dense).
  kernel = kernel.reshape(TORCH_POOL, TORCH_POOL, channels, -1).astype(np.float64)
  pool = adaptive_pool_matrix(side)
  folded = np.einsum('ih,jw,ijco->hwco', pool, pool, kernel, optimize=True)
  params = dict(variables['params'])
  params['fc1'] = dict(params['fc1'], kernel=folded.reshape(side * side * channels, -1)
                       .astype(np.float32))
  return dict(variables, params=params)


def convert_torchvision(tensors: Mapping[str, np.ndarray], origin: str = 'state_dict', *,
                        image_size: int = name_maps.IMAGE_SIZE, **overrides
                        ) -> tuple[models.VGG, dict[str, Any]]:
  """Any torchvision-layout VGG state dict as (model, variables) at `image_size`.

  The architecture is read off the tensors (`torchvision_architecture`); the
  'fc' head is folded for `image_size` (`torchvision_fc1_for`).
  """
  kwargs, in_channels = architecture.torchvision_architecture(tensors, origin)
  model = models.VGG(**kwargs, **overrides)
  entries = torchvision_name_map(0, model.batch_norm, variant=model.cfg_name,
                                 include_top=model.head == 'fc')
  variables = name_maps.apply_name_map(
      tensors, entries, depth=model.depth, batch_norm=model.batch_norm,
      num_classes=model.num_classes, origin=origin, model=model, in_channels=in_channels,
      ignore=_is_counter)
  variables.setdefault('batch_stats', {})
  if model.head == 'fc' and image_size // 32 != TORCH_POOL:
    variables = torchvision_fc1_for(variables, image_size)
  return model, variables
