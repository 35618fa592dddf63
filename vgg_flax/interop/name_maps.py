"""What the torchvision and Keras importers share: the name map and the shape checks.

An import is an explicit name map (`Entry`): every tensor the model needs is
looked up by name, its shape checked against what the model expects
(`expected_shapes`), and a missing, extra or mis-shaped tensor raises
`WeightImportError` naming it (`apply_name_map`). Nothing is ever loaded
partially. `shape_mismatch` checks variables built otherwise (Keras files
matched by layer order, `vgg_flax.load`'s overrides) against a model.

The importers are `weights` (torchvision) and `keras_weights`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vgg_flax import models
from vgg_flax.runtime.errors import WeightImportError

SOURCES = ('torchvision', 'keras')
# The input preprocessing each source was trained with (config.input.preset).
PRESET = {'torchvision': 'torchvision', 'keras': 'caffe'}
IMAGE_SIZE = 224  # The size the imported 'fc' heads expect (7x7x512 before fc1).
FC_DIM = 4096  # The width of their fc1 and fc2.
COLLECTIONS = ('params', 'batch_stats')  # The variables a weight file holds.


@dataclasses.dataclass(frozen=True)
class Entry:
  """One tensor of the name map."""
  source: str  # Name in the source file.
  collection: str  # 'params' or 'batch_stats'.
  path: tuple[str, ...]  # Path in the Flax collection.
  to_flax: Callable[[np.ndarray], np.ndarray]  # Source layout -> Flax layout.
  source_shape: Callable[[tuple[int, ...]], tuple[int, ...]]  # Flax shape -> source shape.
  to_source: Callable[[np.ndarray], np.ndarray] = None  # Flax layout -> source (export).


def _same(x):
  return x


def _same_shape(shape):
  return tuple(shape)


def as_is(source: str, collection: str, path: tuple[str, ...]) -> Entry:
  """The entry of a tensor whose layout is the same in both frameworks."""
  return Entry(source, collection, path, _same, _same_shape, _same)


def expected_shapes(depth: int, batch_norm: bool, num_classes: int | None,
                    image_size: int = IMAGE_SIZE, *, model: models.VGG | None = None,
                    in_channels: int = 3,
                    ) -> dict[tuple[str, tuple[str, ...]], tuple[int, ...]]:
  """Shapes of every variable of the VGG; no 'fc' head if num_classes is None.

  `image_size` only changes fc1's inputs: (image_size // 32)**2 * 512. `model`
  replaces the VGG the other arguments describe (any width, head or column).
  """
  model = model or models.VGG(depth=depth, batch_norm=batch_norm, num_classes=num_classes or 1,
                              head='fc' if num_classes else 'none', fc_dim=FC_DIM)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          jnp.zeros((1, image_size, image_size, in_channels), jnp.float32))
  return {(collection, tuple(k.key for k in path)): tuple(leaf.shape)
          for collection, tree in shapes.items()
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def shape_mismatch(model, variables: Mapping[str, Any], image_size: int, in_channels: int):
  """The first variable whose shape is not the one `model` expects; None if all fit.

  Compares the `COLLECTIONS` both ways, in sorted order: a missing or an
  extra variable does not fit either.

  Returns:
    `((collection, path), expected shape, found shape)`, a shape None where
    that side has no such variable; or None.
  """
  shapes = expected_shapes(0, False, None, image_size, model=model, in_channels=in_channels)
  want = {key: shape for key, shape in shapes.items() if key[0] in COLLECTIONS}
  have = {(c, tuple(k.key for k in path)): tuple(np.shape(leaf)) for c in COLLECTIONS
          for path, leaf in jax.tree_util.tree_flatten_with_path(variables.get(c) or {})[0]}
  for key in sorted(set(want) | set(have)):
    if want.get(key) != have.get(key):
      return key, want.get(key), have.get(key)
  return None


def check_depth(depth: int) -> None:
  """Raises ValueError for a depth that is not one of the paper's VGGs."""
  if depth not in models.DEPTH_TO_VARIANT:
    raise ValueError(f'depth={depth!r} is not allowed: expected one of '
                     f'{", ".join(map(str, models.DEPTH_TO_VARIANT))}')


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
  model = describe(model or models.VGG(depth=depth, batch_norm=batch_norm))
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
