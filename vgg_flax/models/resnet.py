"""ResNet-50 (He et al., 2016), torchvision's v1.5 layout: a baseline next to the VGGs.

Stem: 7x7 stride-2 conv, BatchNorm, ReLU, 3x3 stride-2 max pool. Then four
stages of bottleneck blocks (1x1 reduce, 3x3, 1x1 expand by 4, each conv
without bias and followed by BatchNorm), the first block of stages 2-4 putting
its stride 2 on the 3x3 conv (v1.5; the paper's v1 puts it on the first 1x1),
and a 1x1 projection + BatchNorm on the shortcut wherever the shape changes.
Global average pool and a dense classifier close it. Padding is torchvision's
(k // 2 on each side), so feature maps have torchvision's sizes and a 224 px
image ends as 7x7x2048. Convs start from torchvision's He (fan-out) normal;
every BatchNorm scale from 1 (torchvision's default: no zero-init of a block's
last BN).

Layers are named flat like the VGG's (`stem_conv`, `stage2_block1_conv2`,
`stage2_block1_proj_bn`, `predictions`): checkpoints and `config.freeze`
regexes ('stage1', 'stem') rely on them.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vgg_flax.models import layers

Array = jax.Array

STAGE_WIDTHS = (64, 128, 256, 512)  # Bottleneck (3x3) channels of each stage at width 64.
EXPANSION = 4  # A block's output has 4x its bottleneck channels.
HEADS = ('gap', 'none')
# torchvision's kaiming_normal_(mode='fan_out', nonlinearity='relu') for convs.
CONV_INIT = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def _allowed(field: str, value: Any, allowed: str) -> ValueError:
  return ValueError(f'ResNet.{field}={value!r} is not allowed: {allowed}')


def stage_channels(width: int, num_stages: int = 4) -> list[tuple[int, int]]:
  """(bottleneck, output) channels of each stage for stem `width` (64 = paper)."""
  mids = [max(1, c * width // 64) for c in STAGE_WIDTHS[:num_stages]]
  return [(m, EXPANSION * m) for m in mids]


def block_stride(stage: int, block: int) -> int:
  """Stride of block `block` of stage `stage` (both 1-based): 2 opens stages 2-4."""
  return 2 if stage > 1 and block == 1 else 1


class ResNet(nn.Module):
  """A bottleneck ResNet (ResNet-50 with the default `stage_sizes`).

  Attributes:
    stage_sizes: bottleneck blocks per stage, at most 4 stages (3, 4, 6, 3 =
      ResNet-50; (3, 4, 23, 3) = ResNet-101).
    num_classes: outputs of the classifier.
    width: channels of the stem; the stages scale with it (64 = paper: 256,
      512, 1024, 2048 output channels).
    head: 'gap' (global average pool, `predictions`) or 'none' (the pooled
      (N, C) features).
    conv_impl: `layers.Conv` lowering of the stride-1 convs: 'auto', 'xla',
      'patches' or 'winograd'.
    dtype: compute dtype of every layer; outputs are cast to float32.
    param_dtype: dtype of the parameters.
  """
  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  num_classes: int = 1000
  width: int = 64
  head: str = 'gap'
  conv_impl: str = 'auto'
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    # Fail when the model is built, before any tracing, naming the field.
    if not 1 <= len(self.stage_sizes) <= len(STAGE_WIDTHS) or min(self.stage_sizes) < 1:
      raise _allowed('stage_sizes', self.stage_sizes,
                     f'1 to {len(STAGE_WIDTHS)} stages of >= 1 block each')
    if self.head not in HEADS:
      raise _allowed('head', self.head, 'expected one of ' + ', '.join(map(repr, HEADS)))
    if self.conv_impl not in layers.CONV_IMPLS:
      raise _allowed('conv_impl', self.conv_impl,
                     'expected one of ' + ', '.join(map(repr, layers.CONV_IMPLS)))
    for field in ('num_classes', 'width'):
      if getattr(self, field) < 1:
        raise _allowed(field, getattr(self, field), 'must be >= 1')
    super().__post_init__()

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    """Runs the network.

    Args:
      x: images, NHWC, any number of channels. Each of ResNet-50's five
        stride-2 layers halves the side rounding up: 32 px ends as 1x1.
      train: normalise with batch statistics and update the running ones.

    Returns:
      float32 logits (N, num_classes), or for head 'none' the float32 pooled
      features (N, C), C = 2048 for ResNet-50 at width 64.
    """
    if x.ndim != 4:
      raise ValueError(f'ResNet expects NHWC images, got an input of shape {x.shape}')
    bn = layers.batch_norm(train, self.dtype, self.param_dtype)

    def conv(features: int, k: int, stride: int, name: str) -> nn.Module:
      if stride == 1:
        # SAME at stride 1 is torchvision's padding k // 2 (k odd).
        return layers.Conv(features, k, use_bias=False, impl=self.conv_impl,
                           kernel_init=CONV_INIT, dtype=self.dtype,
                           param_dtype=self.param_dtype, name=name)
      # layers.Conv is stride 1 only: strided convs are nn.Conv, with
      # torchvision's explicit padding (SAME would pad 0 before, 1 after).
      return nn.Conv(features, (k, k), (stride, stride), padding=[(k // 2, k // 2)] * 2,
                     use_bias=False, kernel_init=CONV_INIT, dtype=self.dtype,
                     param_dtype=self.param_dtype, name=name)

    x = nn.relu(bn(name='stem_bn')(conv(self.width, 7, 2, 'stem_conv')(x)))
    x = layers.MaxPool(window=3, stride=2, padding=1, name='stem_pool')(x)
    channels = stage_channels(self.width, len(self.stage_sizes))
    for s, (num_blocks, (mid, out)) in enumerate(zip(self.stage_sizes, channels), 1):
      for b in range(1, num_blocks + 1):
        name, stride = f'stage{s}_block{b}', block_stride(s, b)
        y = nn.relu(bn(name=f'{name}_bn1')(conv(mid, 1, 1, f'{name}_conv1')(x)))
        y = nn.relu(bn(name=f'{name}_bn2')(conv(mid, 3, stride, f'{name}_conv2')(y)))
        y = bn(name=f'{name}_bn3')(conv(out, 1, 1, f'{name}_conv3')(y))
        if stride != 1 or x.shape[-1] != out:
          x = bn(name=f'{name}_proj_bn')(conv(out, 1, stride, f'{name}_proj_conv')(x))
        x = nn.relu(x + y)

    x = layers.GlobalPool('avg', name='avg_pool')(x)
    if self.head == 'gap':
      x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                   name='predictions')(x)
    # The loss and the metrics stay float32 whatever the compute dtype.
    return x.astype(jnp.float32)


resnet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3))
