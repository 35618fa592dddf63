"""Building blocks of the VGG networks: convolution, pooling, normalisation.

`Conv` keeps `nn.Conv`'s parameter layout (`kernel` HWIO, `bias`) but can lower
to one matmul over shifted copies of the input ('patches'), or, for 3x3
kernels, to Winograd's F(2x2, 3x3) ('winograd': 16 batched matmuls doing 4/9
of the multiplications, in the forward and, through autodiff, both backward
products). Both are several times faster than XLA's CPU convolution for the
small VGG kernels (benchmarks/README.md).
`max_pool_2x2` is written as a reshape + max for the same reason: the backward
pass of `nn.max_pool` (select-and-scatter) is slow on the CPU.

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

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]

CONV_IMPLS = ('auto', 'xla', 'patches', 'winograd')
# 'auto' on the CPU: Winograd from this feature-map side up. On 2x2 maps most
# of a tile is padding and the transforms cost more than they save (measured).
WINOGRAD_MIN_SIDE = 4
# ... and from this many input channels up: the first layer (1 or 3 channels)
# gains nothing from fewer multiplications and pays 16/9 more transform traffic.
WINOGRAD_MIN_CHANNELS = 16


def resolve_conv_impl(impl: str, kernel_size: int = 3, min_side: int | None = None,
                      in_channels: int | None = None) -> str:
  """Maps 'auto' to the lowering that is fastest on the current backend.

  Args:
    impl: 'auto', 'xla', 'patches' or 'winograd'.
    kernel_size: side of the kernel; Winograd only exists for 3.
    min_side: smaller side of the input feature map; None = large.
    in_channels: input channels; None = many.

  Returns:
    For 'auto': 'xla' on GPU/TPU and 'patches' on the CPU. 'winograd' (opt-in)
    is used for a 3x3 kernel on a map of side >= WINOGRAD_MIN_SIDE with >=
    WINOGRAD_MIN_CHANNELS input channels, 'patches' elsewhere. `impl` otherwise.

  Raises:
    ValueError: for an unknown `impl`.
  """
  if impl not in CONV_IMPLS:
    raise ValueError(f'Conv.impl={impl!r} is not allowed: expected one of '
                     + ', '.join(map(repr, CONV_IMPLS)))
  if impl == 'auto':
    # GPUs and TPUs have fast native convolutions; only XLA's CPU one is slow.
    # Winograd is opt-in: ~25% faster per step here, but 3-4x slower to compile.
    return 'xla' if jax.default_backend() != 'cpu' else 'patches'
  large = ((min_side is None or min_side >= WINOGRAD_MIN_SIDE)
           and (in_channels is None or in_channels >= WINOGRAD_MIN_CHANNELS))
  if impl == 'winograd' and (kernel_size != 3 or not large):
    return 'patches'
  return impl


def _same_padding(k: int) -> tuple[int, int]:
  # XLA's SAME for stride 1: the odd extra pixel (even k) goes after.
  return (k - 1) // 2, k // 2


def conv_patches(x: Array, kernel: Array) -> Array:
  """Stride-1 SAME convolution as one matmul over shifted copies of `x`.

  The k*k shifted views of the padded input are concatenated along the
  channel axis, rows i outer and columns j inner, so that patch channel
  `(i * k + j) * C + c` meets row `(i * k + j) * C + c` of
  `kernel.reshape(k * k * C, O)` (the row-major flattening of HWIO).

  Args:
    x: input, NHWC.
    kernel: HWIO kernel with square spatial size k.

  Returns:
    The NHWO output, in the common dtype of `x` and `kernel`.
  """
  k, _, c_in, c_out = kernel.shape
  n, h, w, _ = x.shape
  if k > 1:
    lo, hi = _same_padding(k)
    xp = jnp.pad(x, ((0, 0), (lo, hi), (lo, hi), (0, 0)))
    x = jnp.concatenate(
        [xp[:, i:i + h, j:j + w, :] for i in range(k) for j in range(k)], axis=-1)
  # A 2-D matmul is what the CPU backend maps onto its fastest GEMM.
  y = jnp.dot(x.reshape(n * h * w, k * k * c_in), kernel.reshape(k * k * c_in, c_out))
  return y.reshape(n, h, w, c_out)


def _winograd_input_1d(x: Array, tiles: int, axis: int) -> list[Array]:
  # B^T d for the 4-wide input windows at stride 2 along `axis`,
  # B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]].
  d0, d1, d2, d3 = (lax.slice_in_dim(x, r, r + 2 * tiles - 1, 2, axis) for r in range(4))
  return [d0 - d2, d1 + d2, d2 - d1, d1 - d3]


def _winograd_kernel_1d(g: Array, axis: int) -> Array:
  # G g with G = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]].
  g0, g1, g2 = (lax.index_in_dim(g, i, axis, keepdims=False) for i in range(3))
  return jnp.stack([g0, 0.5 * (g0 + g1 + g2), 0.5 * (g0 - g1 + g2), g2], axis=axis)


def conv_winograd(x: Array, kernel: Array) -> Array:
  """Stride-1 SAME 3x3 convolution as Winograd's F(2x2, 3x3) (Lavin & Gray, 2016).

  Each 2x2 output tile is A^T [(G g G^T) . (B^T d B)] A for its 4x4 input
  window d. The 16 products over channels are one batched matmul of
  (16, tiles, C) by (16, C, O): 4 multiplications per output instead of 9.
  The kernel transform is part of the graph, so the parameters stay the HWIO
  kernel and the gradients flow back to it; the backward pass of the batched
  matmul is again two batched matmuls of the same reduced size. Odd sides are
  padded up to even and cropped.

  Args:
    x: input, NHWC.
    kernel: HWIO kernel of spatial size 3x3.

  Returns:
    The NHWO output, in the common dtype of `x` and `kernel`.
  """
  n, h, w, c = x.shape
  c_out = kernel.shape[-1]
  th, tw = -(-h // 2), -(-w // 2)  # 2x2 output tiles per column and row.
  xp = jnp.pad(x, ((0, 0), (1, 2 * th - h + 1), (1, 2 * tw - w + 1), (0, 0)))
  v = [b for a in _winograd_input_1d(xp, th, 1) for b in _winograd_input_1d(a, tw, 2)]
  v = jnp.stack(v).reshape(16, n * th * tw, c)
  u = _winograd_kernel_1d(_winograd_kernel_1d(kernel, 0), 1).reshape(16, c, c_out)
  m = lax.dot_general(v, u, (((2,), (1,)), ((0,), (0,))))
  m = m.reshape(4, 4, n, th, tw, c_out)
  # A^T m A with A^T = [[1, 1, 1, 0], [0, 1, -1, -1]], rows then columns.
  rows = [m[0] + m[1] + m[2], m[1] - m[2] - m[3]]
  y = [[r[0] + r[1] + r[2], r[1] - r[2] - r[3]] for r in rows]
  y = jnp.stack([jnp.stack(r, axis=3) for r in y], axis=2)  # (n, th, 2, tw, 2, o)
  return y.reshape(n, 2 * th, 2 * tw, c_out)[:, :h, :w]


def conv_xla(x: Array, kernel: Array) -> Array:
  """Stride-1 SAME convolution with `lax.conv_general_dilated` (NHWC, HWIO)."""
  return lax.conv_general_dilated(
      x, kernel, window_strides=(1, 1), padding='SAME',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


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
      shifted copies, fast on the CPU), 'winograd' (F(2x2, 3x3) for 3x3
      kernels, 'patches' for others) or 'auto' (per layer, decided when the
      function is traced: on the CPU 'winograd' for 3x3 kernels on maps of
      side >= 4 with >= 16 channels, else 'patches'; 'xla' on GPU/TPU).
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
    impl = resolve_conv_impl(self.impl, k, min(x.shape[1:3]), x.shape[-1])
    kernel = self.param('kernel', self.kernel_init, (k, k, x.shape[-1], self.features),
                        self.param_dtype)
    bias = (self.param('bias', self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    # Like nn.Conv: float32 master parameters, compute in `dtype`.
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    y = {'patches': conv_patches, 'winograd': conv_winograd, 'xla': conv_xla}[impl](x, kernel)
    if bias is not None:
      y = y + bias
    return y


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
