"""The weight name maps and the torchvision importer; Keras is in `keras_weights`.

The importers return the Flax variables `{'params': ..., 'batch_stats': ...}`
of `models.VGG(depth, batch_norm, num_classes)` with the 'fc' head (or head
'none' for a Keras file without top), as float32 numpy arrays. The import is
an explicit name map: every tensor the model needs is looked up by name, its
shape checked against what the model expects, and a missing, extra or
mis-shaped tensor raises `WeightImportError` naming it. Nothing is ever loaded
partially.

torchvision layout (`torchvision.models.vgg16(...).state_dict()`):
  features.N.{weight,bias}          conv, OIHW; N counts every conv, BN, ReLU, pool
  features.N.{weight,bias,running_mean,running_var,num_batches_tracked}  BN (_bn)
  classifier.{0,3,6}.{weight,bias}  Linear, (out, in); classifier.0 after
                                     AdaptiveAvgPool2d(7) + an NCHW flatten
Keras layout (`keras.applications.VGG16(...)`): layers named like ours
(`block1_conv1`, `fc1`, `fc2`, `predictions`), kernels already HWIO / (in, out),
and `Flatten` over NHWC, so no tensor is transposed.

Runtime code never imports torch: `.pth`/`.pt` files need it (imported lazily);
state dicts of arrays and `.npz` files do not. `torchvision_architecture` reads
a whole VGG off a state dict (column, BatchNorm, channels, input channels, FC
widths, classes); `weights_export` writes the other way with the same maps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vgg_flax.interop import architecture
from vgg_flax.io import storage
from vgg_flax import models
from vgg_flax.runtime.errors import WeightImportError

# torchvision's classifier sees AdaptiveAvgPool2d((7, 7)) of 512 channels.
TORCH_POOL = 7
TORCH_FC_DIM = 4096
IMAGE_SIZE = 224  # The size the imported 'fc' heads expect (7x7x512 before fc1).
SOURCES = ('torchvision', 'keras')
# The input preprocessing each source was trained with (config.input.preset).
PRESET = {'torchvision': 'torchvision', 'keras': 'caffe'}


@dataclasses.dataclass(frozen=True)
class Entry:
  """One tensor of the name map."""
  source: str  # Name in the source file.
  collection: str  # 'params' or 'batch_stats'.
  path: tuple[str, ...]  # Path in the Flax collection.
  to_flax: Callable[[np.ndarray], np.ndarray]  # Source layout -> Flax layout.
  source_shape: Callable[[tuple[int, ...]], tuple[int, ...]]  # Flax shape -> source shape.
  to_source: Callable[[np.ndarray], np.ndarray] = None  # Flax layout -> source (export).


def same(x):
  """An Entry's conversion for a tensor taken as it is (the Keras importer's too)."""
  return x


def same_shape(shape):
  """An Entry's shape map for a tensor of the same layout in both frameworks."""
  return tuple(shape)


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


def expected_shapes(depth: int, batch_norm: bool, num_classes: int | None,
                    image_size: int = IMAGE_SIZE, *, model: models.VGG | None = None,
                    in_channels: int = 3,
                    ) -> dict[tuple[str, tuple[str, ...]], tuple[int, ...]]:
  """Shapes of every variable of the VGG; no 'fc' head if num_classes is None.

  `image_size` only changes fc1's inputs: (image_size // 32)**2 * 512. `model`
  replaces the VGG the other arguments describe (any width, head or column).
  """
  model = model or models.VGG(depth=depth, batch_norm=batch_norm, num_classes=num_classes or 1,
                              head='fc' if num_classes else 'none', fc_dim=TORCH_FC_DIM)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          jnp.zeros((1, image_size, image_size, in_channels), jnp.float32))
  return {(collection, tuple(k.key for k in path)): tuple(leaf.shape)
          for collection, tree in shapes.items()
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _conv_layers(depth: int) -> list[str]:
  cfg = models.CFGS[models.DEPTH_TO_VARIANT[depth]]
  return [f'block{b}_conv{i}' for b, kernels in enumerate(cfg, 1)
          for i in range(1, len(kernels) + 1)]


def torchvision_name_map(depth: int, batch_norm: bool = False, *, variant: str = '',
                         include_top: bool = True) -> list[Entry]:
  """The tensors of torchvision's `vgg{depth}[_bn]`, in `state_dict` order.

  `variant` (a column of `models.CFGS`) wins over `depth`, for torchvision-layout
  models of another column; `include_top=False` leaves out the classifier.
  """
  if not variant:
    check_depth(depth)
  entries = []
  index = 0  # features.N counts every module of torchvision's nn.Sequential.
  cfg = models.CFGS[variant or models.DEPTH_TO_VARIANT[depth]]
  for b, kernels in enumerate(cfg, 1):
    for i in range(1, len(kernels) + 1):
      conv = f'block{b}_conv{i}'
      entries += [
          Entry(f'features.{index}.weight', 'params', (conv, 'kernel'), _oihw_to_hwio,
                _hwio_to_oihw_shape, _hwio_to_oihw),
          Entry(f'features.{index}.bias', 'params', (conv, 'bias'), same, same_shape)]
      index += 1
      if batch_norm:
        bn = f'block{b}_bn{i}'
        entries += [  # Same epsilon (1e-5) in both; momentum only matters in training.
            Entry(f'features.{index}.weight', 'params', (bn, 'scale'), same, same_shape),
            Entry(f'features.{index}.bias', 'params', (bn, 'bias'), same, same_shape),
            Entry(f'features.{index}.running_mean', 'batch_stats', (bn, 'mean'), same,
                  same_shape),
            Entry(f'features.{index}.running_var', 'batch_stats', (bn, 'var'), same,
                  same_shape)]
        index += 1
      index += 1  # ReLU.
    index += 1  # MaxPool2d.
  if not include_top:
    return entries
  # classifier: 0 Linear, 1 ReLU, 2 Dropout, 3 Linear, 4 ReLU, 5 Dropout, 6 Linear.
  entries += [
      Entry('classifier.0.weight', 'params', ('fc1', 'kernel'), _torch_fc1_to_dense,
            _dense_to_linear_shape, _dense_to_torch_fc1),
      Entry('classifier.0.bias', 'params', ('fc1', 'bias'), same, same_shape)]
  for index, name in ((3, 'fc2'), (6, 'predictions')):
    entries += [
        Entry(f'classifier.{index}.weight', 'params', (name, 'kernel'), _linear_to_dense,
              _dense_to_linear_shape, _linear_to_dense),
        Entry(f'classifier.{index}.bias', 'params', (name, 'bias'), same, same_shape)]
  return entries


def check_depth(depth: int) -> None:
  """Raises ValueError for a depth that is not one of the paper's VGGs."""
  if depth not in models.DEPTH_TO_VARIANT:
    raise ValueError(f'depth={depth!r} is not allowed: expected one of '
                     f'{", ".join(map(str, models.DEPTH_TO_VARIANT))}')


def _describe(depth: int, batch_norm: bool) -> str:
  return f'VGG-{depth}{"-BN" if batch_norm else ""}'


def describe(model: models.VGG) -> str:
  """'VGG-16-BN', 'VGG-C', 'VGG-11 (width 8)': for messages."""
  name = (f'VGG-{model.depth}' if model.cfg_name in models.DEPTH_TO_VARIANT.values()
          else f'VGG-{model.cfg_name}')
  return (name + '-BN' * model.batch_norm
          + (f' (width {model.width})' if model.width != 64 else ''))


def apply_name_map(tensors: Mapping[str, np.ndarray], entries: list[Entry], *, depth: int,
                   batch_norm: bool, num_classes: int | None, origin: str,
                   ignore: Callable[[str], bool] = lambda name: False,
                   hint: str = '', image_size: int = IMAGE_SIZE,
                   model: models.VGG | None = None, in_channels: int = 3) -> dict[str, Any]:
  """Checks every tensor by name and shape and returns the Flax variables.

  Args:
    tensors: source name -> array in the source layout.
    entries: the name map.
    depth, batch_norm, num_classes: the vgg_flax model the variables are for
      (num_classes None: no 'fc' head).
    origin: the file or object, for error messages.
    ignore: source names that are not weights (e.g. BN's num_batches_tracked).
    hint: appended to errors (e.g. what the file looks like instead).
    image_size: the input size the 'fc' head is for.
    model: the VGG instead of depth/batch_norm/num_classes (any width, head).
    in_channels: the input channels of the first conv.

  Raises:
    WeightImportError: a missing, unexpected or mis-shaped tensor, by name.
  """
  shapes = expected_shapes(depth, batch_norm, num_classes, image_size, model=model,
                           in_channels=in_channels)
  model = describe(model) if model is not None else _describe(depth, batch_norm)
  mapped = {(e.collection, e.path) for e in entries}
  if mapped != set(shapes):  # The name map must cover the model exactly.
    raise AssertionError(f'name map of {model} is out of date: {sorted(mapped ^ set(shapes))}')
  known = {e.source for e in entries}
  unexpected = sorted(n for n in tensors if n not in known and not ignore(n))
  if unexpected:
    raise WeightImportError(
        f'{origin}: unexpected tensor {unexpected[0]!r} ({len(unexpected)} in all: '
        f'{", ".join(unexpected[:6])}{", ..." if len(unexpected) > 6 else ""}) for {model}; '
        f'is the file for another depth or batch_norm setting?{hint}')
  missing = [e.source for e in entries if e.source not in tensors]
  if missing:
    raise WeightImportError(
        f'{origin}: tensor {missing[0]!r} is missing ({len(missing)} of {len(entries)} '
        f'{model} tensors missing: {", ".join(missing[:6])}{", ..." if len(missing) > 6 else ""});'
        f' the file is truncated or for another model.{hint}')
  variables: dict[str, Any] = {}
  for e in entries:
    array = np.asarray(tensors[e.source])
    want = e.source_shape(shapes[(e.collection, e.path)])
    if tuple(array.shape) != want:
      raise WeightImportError(
          f'{origin}: tensor {e.source!r} has shape {tuple(array.shape)}, but {model} '
          f'expects {want} for {"/".join(e.path)}; is the file for another depth?{hint}')
    if not np.issubdtype(array.dtype, np.floating):
      raise WeightImportError(f'{origin}: tensor {e.source!r} has dtype {array.dtype}, '
                              'expected floating point.')
    node = variables.setdefault(e.collection, {})
    for key in e.path[:-1]:
      node = node.setdefault(key, {})
    node[e.path[-1]] = np.ascontiguousarray(e.to_flax(array.astype(np.float32)))
  return variables


# ----------------------------------------------------------------------------- torchvision


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
  check_depth(depth)
  last = tensors.get('classifier.6.weight')
  num_classes = int(np.shape(last)[0]) if last is not None and np.ndim(last) == 2 else 1000
  hint = ''
  try:
    found = infer_torchvision(tensors)
    if found != (depth, batch_norm):
      hint = f' (the file looks like {_describe(*found)})'
  except WeightImportError:
    pass
  variables = apply_name_map(tensors, torchvision_name_map(depth, batch_norm), depth=depth,
                             batch_norm=batch_norm, num_classes=num_classes, origin=origin,
                             ignore=lambda n: n.endswith('.num_batches_tracked'), hint=hint)
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
                        image_size: int = IMAGE_SIZE, **overrides
                        ) -> tuple[models.VGG, dict[str, Any]]:
  """Any torchvision-layout VGG state dict as (model, variables) at `image_size`.

  The architecture is read off the tensors (`torchvision_architecture`); the
  'fc' head is folded for `image_size` (`torchvision_fc1_for`).
  """
  kwargs, in_channels = architecture.torchvision_architecture(tensors, origin)
  model = models.VGG(**kwargs, **overrides)
  entries = torchvision_name_map(0, model.batch_norm, variant=model.cfg_name,
                                 include_top=model.head == 'fc')
  variables = apply_name_map(tensors, entries, depth=model.depth, batch_norm=model.batch_norm,
                             num_classes=model.num_classes, origin=origin, model=model,
                             in_channels=in_channels,
                             ignore=lambda n: n.endswith('.num_batches_tracked'))
  variables.setdefault('batch_stats', {})
  if model.head == 'fc' and image_size // 32 != TORCH_POOL:
    variables = torchvision_fc1_for(variables, image_size)
  return model, variables
