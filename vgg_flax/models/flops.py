"""Analytic FLOPs of a VGG or ResNet, the peak FLOP/s of the device, and MFU.

MFU (model FLOPs utilisation) = analytic model FLOPs per second / the device's
peak. The FLOPs are those of the textbook network (2 per multiply-add of every
conv and dense layer; pooling, ReLU, BatchNorm and the optimiser are not
counted), so a lowering that does fewer multiplications (Winograd) can exceed
what a plain matmul reaches: that is the point of it, and the number still
compares across implementations and hardware.

A training step counts 3x the forward FLOPs (forward, input gradient, weight
gradient), the usual convention for MFU.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from vgg_flax import models
from vgg_flax.models import resnet

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
  """One accelerator's datasheet figures, per device (a GPU, a TPU chip)."""
  bf16_flops: float  # Dense (no sparsity) bfloat16 peak, FLOP/s.
  # float32 at XLA's default precision: TF32 tensor cores on A100/H100/H200
  # (XLA's default for float32 dots and convolutions there), plain FP32 on V100,
  # one bfloat16 pass on TPUs.
  f32_flops: float
  # Bytes of HBM; None for the GPUs, whose target spec (vgg_flax/gpu_specs/,
  # `device_memory_size`) states it to the byte.
  memory: int | None = None


# From the vendors' datasheets. Keys are matched case-insensitively as substrings
# of `jax.Device.device_kind`, longest key first.
DEVICES = {
    'H100 SXM': DeviceSpec(989e12, 495e12),
    'H100 80GB HBM3': DeviceSpec(989e12, 495e12),  # The SXM part's device_kind.
    'H100 PCIe': DeviceSpec(756e12, 378e12),
    'H100': DeviceSpec(989e12, 495e12),
    'H200': DeviceSpec(989e12, 495e12),
    'A100': DeviceSpec(312e12, 156e12),
    # Volta has no bfloat16 tensor cores: XLA computes bfloat16 in float32 there.
    'V100': DeviceSpec(15.7e12, 15.7e12),
    'TPU v4': DeviceSpec(275e12, 275e12, 32 * GiB),
    'TPU v5 lite': DeviceSpec(197e12, 197e12, 16 * GiB),  # v5e's device_kind.
    'TPU v5e': DeviceSpec(197e12, 197e12, 16 * GiB),
    'TPU v5p': DeviceSpec(459e12, 459e12, 95 * GiB),
    'TPU v5': DeviceSpec(459e12, 459e12, 95 * GiB),
    'TPU v6 lite': DeviceSpec(918e12, 918e12, 32 * GiB),  # v6e (Trillium).
    'TPU v6e': DeviceSpec(918e12, 918e12, 32 * GiB),
}


def device_spec(device_kind: str) -> tuple[str, DeviceSpec] | None:
  """The `DEVICES` entry (key, spec) of a `jax.Device.device_kind`, or None."""
  kind = device_kind.lower()
  for key in sorted(DEVICES, key=len, reverse=True):
    if key.lower() in kind:
      return key, DEVICES[key]
  return None


def conv_layers(model: models.VGG | resnet.ResNet, image_size: int, in_channels: int = 3
                ) -> list[tuple[str, int, int, int, int]]:
  """The conv layers of `model` as (name, output side, kernel, in, out) at `image_size`."""
  if isinstance(model, resnet.ResNet):
    return _resnet_conv_layers(model, image_size, in_channels)
  out, side, c_in = [], image_size, in_channels
  for b, (kernels, channels) in enumerate(
      zip(models.CFGS[model.cfg_name], models.BLOCK_CHANNELS), 1):
    c_out = max(1, channels * model.width // 64)
    for i, k in enumerate(kernels, 1):
      out.append((f'block{b}_conv{i}', side, k or model.kernel_size, c_in, c_out))
      c_in = c_out
    side //= 2
  return out


def _resnet_conv_layers(model: resnet.ResNet, image_size: int, in_channels: int
                        ) -> list[tuple[str, int, int, int, int]]:
  # Every stride-2 layer (padding k // 2) halves the side rounding up.
  side = -(-image_size // 2)
  out = [('stem_conv', side, 7, in_channels, model.width)]
  side, c_in = -(-side // 2), model.width  # stem_pool.
  channels = resnet.stage_channels(model.width, len(model.stage_sizes))
  for s, (num_blocks, (mid, c_out)) in enumerate(zip(model.stage_sizes, channels), 1):
    for b in range(1, num_blocks + 1):
      name, stride = f'stage{s}_block{b}', resnet.block_stride(s, b)
      out_side = -(-side // stride)
      out += [(f'{name}_conv1', side, 1, c_in, mid), (f'{name}_conv2', out_side, 3, mid, mid),
              (f'{name}_conv3', out_side, 1, mid, c_out)]
      if stride != 1 or c_in != c_out:
        out.append((f'{name}_proj_conv', out_side, 1, c_in, c_out))
      side, c_in = out_side, c_out
  return out


def forward_flops(model: models.VGG | resnet.ResNet, image_size: int,
                  in_channels: int = 3) -> int:
  """FLOPs (2 x multiply-adds) of one image through `model`'s convs and head.

  Args:
    model: a `models.VGG` (depth, variant, width, head, its hidden layers, num_classes)
      or a `resnet.ResNet` (stage_sizes, width, head, num_classes).
    image_size: side of the square input.
    in_channels: channels of the input image.

  Returns:
    The forward FLOPs per image, as a Python int.
  """
  macs = sum(side * side * k * k * c_in * c_out
             for _, side, k, c_in, c_out in conv_layers(model, image_size, in_channels))
  if isinstance(model, resnet.ResNet):
    c_last = resnet.stage_channels(model.width, len(model.stage_sizes))[-1][1]
    return 2 * (macs + (c_last * model.num_classes if model.head == 'gap' else 0))
  c_last = max(1, models.BLOCK_CHANNELS[-1] * model.width // 64)
  side = image_size // 32
  dims = []
  if model.head != 'none':
    dims = ([side * side * c_last if model.head == 'fc' else c_last]
            + [width for _, width in model.hidden_layers()] + [model.num_classes])
  macs += sum(a * b for a, b in zip(dims[:-1], dims[1:]))
  return 2 * macs


def train_flops(model: models.VGG | resnet.ResNet, image_size: int,
                in_channels: int = 3) -> int:
  """FLOPs of one image in a training step: 3x the forward pass."""
  return 3 * forward_flops(model, image_size, in_channels)


def measure_matmul_peak(size: int | None = None, dtype=jnp.float32, repeats: int = 7,
                        device: jax.Device | None = None) -> float:
  """Best achieved FLOP/s of a jitted square matmul on `device` (median of runs).

  `size` defaults to the smallest power of two from 1024 whose product takes 3 ms or
  more: enough work for every core of a big host, about 0.1 s of a 2-core machine
  (a launch measures it; 2048 there cost 0.6 CPU-s for the same figure).
  """
  device = device or jax.local_devices()[0]
  f = jax.jit(lambda a, b: a @ b)

  def seconds(a):
    start = time.perf_counter()
    jax.block_until_ready(f(a, a))
    return time.perf_counter() - start

  for n in ((size,) if size else (1024, 2048, 4096)):
    a = jax.device_put(jnp.ones((n, n), dtype), device)
    seconds(a)  # Compiles.
    if seconds(a) >= 3e-3:
      break
  times = [seconds(a) for _ in range(repeats)]
  return 2 * n ** 3 / float(np.median(times))


def device_peak_flops(device: jax.Device | None = None, measure_dtype=jnp.float32,
                      compute_dtype: str = 'bfloat16') -> tuple[float, str]:
  """Peak FLOP/s of one device (default: this process's first) and its source.

  Known GPUs and TPUs: the datasheet's figure (`DEVICES`) for `compute_dtype`
  ('float32': XLA's default float32 precision; anything else: dense bfloat16).
  Anything else (the CPU): a measured matmul in `measure_dtype`.

  Returns:
    (peak FLOP/s, source), source 'table: <key>' or 'measured <dtype> matmul'.
  """
  # A local device: jax.devices()[0] belongs to process 0, and on any other
  # process it cannot be measured (a 2-process run logged 3.6 PFLOP/s peak).
  device = device or jax.local_devices()[0]
  known = device_spec(device.device_kind)
  if known:
    key, spec = known
    return (spec.f32_flops if compute_dtype == 'float32' else spec.bf16_flops), f'table: {key}'
  peak = measure_matmul_peak(dtype=measure_dtype, device=device)
  return peak, f'measured {jnp.dtype(measure_dtype).name} matmul'


def mfu(images_per_sec: float, flops_per_image: float, peak_flops: float) -> float:
  """Model FLOPs utilisation: achieved model FLOP/s over the peak."""
  return images_per_sec * flops_per_image / peak_flops
