"""Which VGG a set of weights is: its column of Table 1, width, BatchNorm and head.

Shared by the torchvision and Keras importers, which read the architecture off
the tensors instead of being told it: the blocks' kernel sizes give the
column (`match_variant`), block 1's channels the `width`, and every other
block must have 2, 4, 8, 8 times as many (`block_channel_error`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from vgg_flax import models
from vgg_flax.runtime import errors


def match_variant(block_kernels: list[list[int]]) -> tuple[str, int] | None:
  """(column of Table 1, kernel_size) whose blocks have these conv kernel sizes."""
  for name, cfg in models.CFGS.items():
    if name in models.LRN_VARIANTS or len(cfg) != len(block_kernels):
      continue
    if any(len(c) != len(k) for c, k in zip(cfg, block_kernels)):
      continue
    free = {k for c, ks in zip(cfg, block_kernels) for fixed, k in zip(c, ks) if fixed is None}
    if len(free) > 1 or any(fixed is not None and fixed != k for c, ks in zip(cfg, block_kernels)
                            for fixed, k in zip(c, ks)):
      continue
    return name, (free.pop() if free else 3)
  return None


def vgg_kwargs(variant: str, kernel_size: int) -> dict[str, Any]:
  """`depth` for the paper's A/B/D/E columns, else `variant`."""
  depth = {v: d for d, v in models.DEPTH_TO_VARIANT.items()}.get(variant)
  return ({'depth': depth} if depth else {'variant': variant}) | {'kernel_size': kernel_size}


def block_channel_error(block: int, channels: int, width: int) -> str | None:
  """Why `channels` does not fit block `block` (1-5) of a VGG of `width`; None if it does."""
  want = max(1, models.BLOCK_CHANNELS[block - 1] * width // 64)
  if channels == want:
    return None
  return (f'has {channels} channels; a VGG of width {width} (block 1: {width} channels) has '
          f'{want} in block {block} (the blocks have 1, 2, 4, 8, 8 times block 1\'s channels)')


def torchvision_architecture(tensors: Mapping[str, np.ndarray], origin: str = 'state_dict'
                             ) -> tuple[dict[str, Any], int]:
  """The `models.VGG` arguments and input channels of a torchvision-layout state dict.

  Blocks are read off the `features.N` indices: conv[, BN], ReLU are
  consecutive modules and a MaxPool2d adds one more between blocks.

  Raises:
    errors.WeightImportError: the first tensor that no torchvision-layout VGG has.
  """
  convs = sorted((int(m.group(1)), np.shape(v)) for k, v in tensors.items()
                 if (m := re.fullmatch(r'features\.(\d+)\.weight', k)) and np.ndim(v) == 4)
  if not convs:
    raise errors.WeightImportError(f'{origin}: no conv weights (features.N.weight); not a '
                            'torchvision VGG state dict.')
  batch_norm = any(re.fullmatch(r'features\.\d+\.running_mean', k) for k in tensors)
  step = 3 if batch_norm else 2  # conv[, bn], relu.
  blocks, shapes, previous = [[]], [[]], None
  for index, shape in convs:
    if previous is not None and index == previous + step + 1:  # A MaxPool2d between.
      blocks.append([])
      shapes.append([])
    elif previous is not None and index != previous + step:
      raise errors.WeightImportError(f'{origin}: features.{index}.weight follows features.{previous}'
                              f'.weight; a torchvision VGG{"-BN" * batch_norm} has its next conv '
                              f'at features.{previous + step} or {previous + step + 1}.')
    if shape[2] != shape[3]:
      raise errors.WeightImportError(f'{origin}: features.{index}.weight has a {shape[2]}x{shape[3]} '
                              'kernel; vgg_flax needs square kernels.')
    blocks[-1].append(shape[2])
    shapes[-1].append((index, shape))
    previous = index
  found = match_variant(blocks)
  if found is None:
    raise errors.WeightImportError(
        f'{origin}: conv kernels per block {blocks} match no VGG column '
        f'({", ".join(n for n in models.CFGS if n not in models.LRN_VARIANTS)}).')
  width = convs[0][1][0]
  for b, block in enumerate(shapes, 1):
    for index, shape in block:
      why = block_channel_error(b, shape[0], width)
      if why:
        raise errors.WeightImportError(f'{origin}: features.{index}.weight {why}.')
  kwargs = vgg_kwargs(*found) | {'batch_norm': batch_norm, 'width': width}
  fc1, last = tensors.get('classifier.0.weight'), tensors.get('classifier.6.weight')
  if fc1 is None and last is None:
    kwargs |= {'head': 'none'}
  elif fc1 is not None and last is not None:
    fc2 = tensors.get('classifier.3.weight')
    widths = (int(np.shape(fc1)[0]), int(np.shape(fc2)[0]) if fc2 is not None else -1)
    kwargs |= {'head': 'fc', 'num_classes': int(np.shape(last)[0])} | (
        {'fc_dim': widths[0]} if widths[1] in (widths[0], -1) else {'hidden_dims': widths})
  else:
    missing = 'classifier.0.weight' if fc1 is None else 'classifier.6.weight'
    raise errors.WeightImportError(f'{origin}: tensor {missing!r} is missing; a torchvision VGG '
                            'classifier has Linear layers at classifier.0, 3 and 6.')
  return kwargs, int(convs[0][1][1])
