"""Building blocks of the VGG networks: convolution, pooling, normalisation.

`Conv` keeps `nn.Conv`'s parameter layout (`kernel` HWIO, `bias`) but can lower
to one matmul over shifted copies of the input ('patches'), or, for 3x3
kernels, to Winograd's F(4x4, 3x3) or F(2x2, 3x3) ('winograd', in
`winograd`). On the CPU both are several times faster than XLA's convolution
for the small VGG kernels, and Winograd is faster than PyTorch's
(benchmarks/README.md).
`max_pool_2x2` is written as a reshape + max for the same reason: the backward
pass of `nn.max_pool` (select-and-scatter) is slow on the CPU.

`Conv`'s default, impl='auto', is settled for the platform the step is
compiled for, not for the one that traces it (`lax.platform_dependent`): the
matmul lowerings on the CPU, XLA's native convolution on GPU and TPU, also
when a CPU host exports or compiles the step ahead of time for them.

`batch_norm` is the one BatchNorm configuration every model uses
(torchvision's momentum and epsilon), so a test of it tests the models'.

The parameter-free modules at the end (`MaxPool2x2`, `MaxPool`, `GlobalPool`,
`LocalResponseNorm`) exist only to give those operations a stable name, so
that they show up as rows of `vgg_flax.summary` like Keras layers do.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from vgg_flax import config as config_choices
from vgg_flax.models import winograd

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]

CONV_IMPLS = config_choices.CONV_IMPLS  # config.model.conv_impl, named once there.
# What `resolve_conv_impl` picks for one layer: the lowering and, for
# Winograd, the output tile side m of F(m x m, 3 x 3).
LOWERINGS = ('xla', 'patches') + tuple(
    f'winograd{m}' for m in sorted(winograd.TILES, reverse=True))


def resolve_conv_impl(impl: str, kernel_size: int = 3,
                      input_shape: Sequence[int] | None = None,
                      platform: str | None = None) -> str:
  """The lowering one layer uses on one platform: one of `LOWERINGS`.

  Args:
    impl: 'auto', 'xla', 'patches' or 'winograd'.
    kernel_size: side of the kernel; Winograd only exists for 3.
    input_shape: NHWC shape of the layer's input as traced (the global batch
      under jit); None = large.
    platform: the one 'auto' is resolved for ('cpu', 'cuda', 'rocm', 'tpu');
      None = this process's `jax.default_backend()`. `Conv` asks for 'cpu' and
      leaves the choice of platform to `lax.platform_dependent`.

  Returns:
    'xla' and 'patches' as asked. 'auto' is 'xla' on GPU/TPU, whose native
    convolutions are fast, and 'winograd' on the CPU. 'winograd' is, per layer,
    'winograd4' (F(4x4, 3x3)) or 'winograd2' (F(2x2, 3x3)) for a 3x3 kernel,
    the tile `winograd.tile_for` finds repays its transforms, else 'patches'.

  Raises:
    ValueError: for an unknown `impl`.
  """
  if impl not in CONV_IMPLS:
    raise ValueError(f'Conv.impl={impl!r} is not allowed: expected one of '
                     + ', '.join(map(repr, CONV_IMPLS)))
  if impl == 'auto':
    platform = platform or jax.default_backend()
    impl = 'winograd' if platform == 'cpu' else 'xla'
  if impl != 'winograd':
    return impl
  if kernel_size != 3:
    return 'patches'
  if input_shape is None:
    return f'winograd{max(winograd.TILES)}'
  tile = winograd.tile_for(input_shape)
  return 'patches' if tile is None else f'winograd{tile}'


def _same_padding(k: int) -> tuple[int, int]:
  # XLA's SAME for stride 1: the odd extra pixel (even k) goes after.
  return (k - 1) // 2, k // 2


def conv_patches(x: Array, kernel: Array, preferred_element_type: Dtype | None = None
                 ) -> Array:
  """Stride-1 SAME convolution as one matmul over shifted copies of `x`.

  The k*k shifted views of the padded input are concatenated along the
  channel axis, rows i outer and columns j inner, so that patch channel
  `(i * k + j) * C + c` meets row `(i * k + j) * C + c` of
  `kernel.reshape(k * k * C, O)` (the row-major flattening of HWIO).

  Args:
    x: input, NHWC.
    kernel: HWIO kernel with square spatial size k.
    preferred_element_type: the dot's accumulation and output dtype; None =
      the common dtype of `x` and `kernel`. float32 for bf16 operands: XLA's
      CPU backend runs a bf16 x bf16 -> float32 dot on the CPU's bf16 units,
      one with a bf16 output below float32's speed (benchmarks/README.md).

  Returns:
    The NHWO output, in `preferred_element_type` or the common dtype.
  """
  k, _, c_in, c_out = kernel.shape
  n, h, w, _ = x.shape
  if k > 1:
    lo, hi = _same_padding(k)
    xp = jnp.pad(x, ((0, 0), (lo, hi), (lo, hi), (0, 0)))
    x = jnp.concatenate(
        [xp[:, i:i + h, j:j + w, :] for i in range(k) for j in range(k)], axis=-1)
  # A 2-D matmul is what the CPU backend maps onto its fastest GEMM.
  y = jnp.dot(x.reshape(n * h * w, k * k * c_in), kernel.reshape(k * k * c_in, c_out),
              preferred_element_type=preferred_element_type)
  return y.reshape(n, h, w, c_out)


def conv_xla(x: Array, kernel: Array, preferred_element_type: Dtype | None = None) -> Array:
  """Stride-1 SAME convolution with `lax.conv_general_dilated` (NHWC, HWIO)."""
  return lax.conv_general_dilated(
      x, kernel, window_strides=(1, 1), padding='SAME',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      preferred_element_type=preferred_element_type)


def conv_fn(lowering: str) -> Callable[..., Array]:
  """The function `f(x, kernel, preferred_element_type=None)` of one of `LOWERINGS`.

  Raises:
    ValueError: for a name that is not in `LOWERINGS`.
  """
  if lowering not in LOWERINGS:
    raise ValueError(f'lowering {lowering!r} is not allowed: expected one of '
                     + ', '.join(map(repr, LOWERINGS)))
  if lowering.startswith('winograd'):
    return functools.partial(winograd.conv_winograd, tile=int(lowering[len('winograd'):]))
  return {'patches': conv_patches, 'xla': conv_xla}[lowering]


class Conv(nn.Module):
  """Stride-1 SAME 2-D convolution with a choice of lowering.

  Parameters are named and shaped like `nn.Conv`'s (`kernel` of shape
  (k, k, in, out), `bias` of shape (out,)), so checkpoints and imported
  weights do not depend on `impl`.

  Attributes:
    features: output channels.
    kernel_size: side of the square kernel.
    use_bias: add a learned bias.
    impl: 'xla' (`lax.conv_general_dilated`), 'patches' (one matmul over
      shifted copies), 'winograd' (per layer from the traced input shape:
      F(4x4, 3x3), F(2x2, 3x3) or 'patches'; see `resolve_conv_impl`) or
      'auto': 'winograd' on the CPU and 'xla' on GPU/TPU, chosen for the
      platform the step is lowered for (`lax.platform_dependent`, which keeps
      only that platform's branch), so that a step exported or compiled ahead
      of time for GPU/TPU on a CPU host gets native convolutions.
    dtype: compute dtype; None takes the promoted dtype of input and params.
    param_dtype: dtype of the stored parameters.
    kernel_init: initialiser of the kernel.
    bias_init: initialiser of the bias.
  """
  features: int
  kernel_size: int
  use_bias: bool = True
  impl: str = 'auto'
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  kernel_init: Initializer = nn.initializers.lecun_normal()
  bias_init: Initializer = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x: Array) -> Array:
    k = self.kernel_size
    # For 'auto', what the CPU branch runs.
    lowering = resolve_conv_impl(self.impl, k, x.shape, platform='cpu')
    kernel = self.param('kernel', self.kernel_init, (k, k, x.shape[-1], self.features),
                        self.param_dtype)
    bias = (self.param('bias', self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    return convolve(x, kernel, bias, impl=self.impl, lowering=lowering, dtype=self.dtype)


@functools.partial(jax.jit, static_argnames=('impl', 'lowering', 'dtype'), inline=True)
def convolve(x: Array, kernel: Array, bias: Array | None, *, impl: str, lowering: str,
             dtype: Dtype | None) -> Array:
  """`Conv`'s computation with its parameters: `lowering` on the CPU (for 'auto',
  the native convolution elsewhere), in `dtype`, plus the bias.

  One program: traced inside a step, its operations are inlined into it, the
  program unchanged; called eagerly (`model.init` or `model.apply` outside
  `jax.jit`, as a notebook does) it is one compile per layer shape, where
  op-by-op dispatch compiled each of Winograd's slices and dots on its own
  (VGG-16's eager `init` at 64 px: 220 compiles, 9.4 s).
  """
  # Like nn.Conv: float32 master parameters, compute in `dtype`.
  wide_bias = bias
  x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=dtype)
  conv = conv_fn(lowering)
  wide = jnp.promote_types(x.dtype, jnp.float32)
  if wide == x.dtype or lowering == 'xla':
    if impl == 'auto':
      # Settled when the step is lowered for its platform; only that branch is kept.
      y = lax.platform_dependent(x, kernel, cpu=conv, default=conv_xla)
    else:
      y = conv(x, kernel)
    return y if bias is None else y + bias

  # bf16/f16 on the CPU: the matmul lowerings accumulate in float32 (bf16 x
  # bf16 -> bf16 dots are the CPU's slowest; Winograd computes in float32
  # anyway) and the bias is added before the one rounding. That also keeps
  # the bias gradient's sum over N, H, W in float32: in bf16, XLA splits it
  # into a slow reduce-window (7% of the bf16 step; benchmarks/README.md).
  def cpu(x: Array, kernel: Array) -> Array:
    y = conv(x, kernel, preferred_element_type=wide)
    return (y if wide_bias is None else y + wide_bias.astype(wide)).astype(x.dtype)

  def native(x: Array, kernel: Array) -> Array:
    y = conv_xla(x, kernel)
    return y if bias is None else y + bias

  if impl == 'auto':
    return lax.platform_dependent(x, kernel, cpu=cpu, default=native)
  return cpu(x, kernel)


def batch_norm(train: bool, dtype: Dtype | None = None,
               param_dtype: Dtype = jnp.float32) -> Callable[..., nn.BatchNorm]:
  """The `nn.BatchNorm` of every vgg_flax model, waiting for its `name`.

  torchvision's constants: a running average kept as 0.9 old + 0.1 batch
  (PyTorch's momentum=0.1) and epsilon 1e-5, so imported running statistics
  mean the same thing here.

  Args:
    train: normalise with the batch statistics (over N, H, W) and update the
      running ones; else use the running ones.
    dtype: compute dtype; None takes the promoted dtype of input and params.
    param_dtype: dtype of scale, bias and the running statistics.

  Returns:
    A `functools.partial` of `nn.BatchNorm`.
  """
  return functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                           epsilon=1e-5, dtype=dtype, param_dtype=param_dtype)


def max_pool_2x2(x: Array) -> Array:
  """2x2 max pooling with stride 2 and VALID padding, NHWC.

  Written as a reshape and a max: on the CPU this is much faster than
  `nn.max_pool`, above all in the backward pass. Cropping an odd last row or
  column is exactly VALID pooling's floor.

  Args:
    x: input of shape (N, H, W, C).

  Returns:
    Output of shape (N, H // 2, W // 2, C).
  """
  n, h, w, c = x.shape
  h2, w2 = h // 2, w // 2
  x = x[:, :h2 * 2, :w2 * 2]
  return x.reshape(n, h2, 2, w2, 2, c).max(axis=(2, 4))


def local_response_norm(x: Array, size: int = 5, alpha: float = 1e-4,
                        beta: float = 0.75, k: float = 2.0) -> Array:
  """Local response normalisation across channels (Krizhevsky et al., 2012).

  b_c = a_c / (k + alpha * sum_{c'} a_{c'}^2) ** beta, the sum running over
  the `size` channels centred on c (clipped at the ends). This is the formula
  of the AlexNet paper, whose constants the VGG paper's A-LRN uses. Note that
  PyTorch's `nn.LocalResponseNorm` (and Caffe's LRN layer) divide alpha by
  `size`; to reproduce them pass `alpha / size` here.

  Args:
    x: input, channels last.
    size: number of channels in the window (n in the paper).
    alpha: scale of the sum of squares.
    beta: exponent.
    k: additive constant.

  Returns:
    The normalised array, same shape and dtype as `x`.
  """
  sq = jnp.square(x)
  # Same split as PyTorch for an even size: the extra channel goes before.
  lo, hi = size // 2, (size - 1) // 2
  pad = [(0, 0)] * (x.ndim - 1) + [(lo, hi)]
  sq = jnp.pad(sq, pad)
  c = x.shape[-1]
  window_sum = sum(sq[..., i:i + c] for i in range(size))
  return x / (k + alpha * window_sum) ** beta


class MaxPool2x2(nn.Module):
  """`max_pool_2x2` as a named layer (no parameters)."""

  @nn.compact
  def __call__(self, x: Array) -> Array:
    return max_pool_2x2(x)


class MaxPool(nn.Module):
  """`nn.max_pool` over a square window with symmetric padding, as a named layer.

  Padded positions are -inf, so they never win (like torchvision's MaxPool2d).

  Attributes:
    window: side of the window.
    stride: step in both spatial axes.
    padding: pixels added on each side of both spatial axes.
  """
  window: int = 3
  stride: int = 2
  padding: int = 1

  @nn.compact
  def __call__(self, x: Array) -> Array:
    pad = ((self.padding, self.padding),) * 2
    return nn.max_pool(x, (self.window,) * 2, (self.stride,) * 2, pad)


class GlobalPool(nn.Module):
  """Global average or max pooling over the spatial axes: NHWC -> NC.

  Attributes:
    kind: 'avg' or 'max'.
  """
  kind: str = 'avg'

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if self.kind not in ('avg', 'max'):
      raise ValueError(f"GlobalPool.kind={self.kind!r} is not allowed: expected one of 'avg', 'max'")
    axes: Sequence[int] = (1, 2)
    return jnp.mean(x, axis=axes) if self.kind == 'avg' else jnp.max(x, axis=axes)


class LocalResponseNorm(nn.Module):
  """`local_response_norm` as a named layer (no parameters); see there."""
  size: int = 5
  alpha: float = 1e-4
  beta: float = 0.75
  k: float = 2.0

  @nn.compact
  def __call__(self, x: Array) -> Array:
    return local_response_norm(x, self.size, self.alpha, self.beta, self.k)
