"""Winograd's F(4x4, 3x3) and F(2x2, 3x3): 3x3 convolutions in fewer multiplications.

One of `layers.Conv`'s lowerings: 36 or 16 batched matmuls doing 1/4 or 4/9
of the multiplications, in the forward and, through autodiff, both backward
products. `tile_for` says which tile size repays its transforms for one layer;
`layers.resolve_conv_impl` asks it.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array

# A tile size is used only when the layer has at least this many output tiles:
# the kernel transform and its gradient cost (m + 2)^2 * C * O whatever the
# batch, so few tiles do not repay them (measured: 14 px maps at batch 8 and
# 4 px maps at batch 128 run faster with F(2x2) than with F(4x4), 2 px maps
# faster with 'patches').
MIN_TILES = 256
# ... and from this many input channels up: the first layer (1 or 3 channels)
# gains nothing from fewer multiplications and pays for the transforms.
MIN_CHANNELS = 16


# Winograd's minimal filtering F(m x m, 3 x 3) (Lavin & Gray, 2016): each m x m
# output tile is A^T [(G g G^T) . (B^T d B)] A for its (m + 2)-wide input tile
# d, at stride m. Per output pixel, (m + 2)^2 / m^2 multiplications per
# channel pair instead of 9: 4 for m = 2, 2.25 for m = 4. Interpolation points
# 0, 1, -1 (and 2, -2 for m = 4), as in the paper.
_WINOGRAD = {  # m: (B^T, G, A^T)
    2: ([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
        [[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]],
        [[1, 1, 1, 0], [0, 1, -1, -1]]),
    4: ([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
         [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]],
        [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
         [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]],
        [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0],
         [0, 1, -1, 8, -8, 1]]),
}
TILES = tuple(_WINOGRAD)


def _left_mul(mat: Array, y: Array) -> Array:
  # mat @ y over y's leading axis: one 2-D matmul.
  return jnp.tensordot(mat, y, axes=1, precision=lax.Precision.HIGHEST)


def _batched_left_mul(mat: Array, y: Array) -> Array:
  # mat @ y[b] for each b of y's leading axis: y is (B, K, X), the result (B, M, X).
  mats = jnp.broadcast_to(mat, (y.shape[0],) + mat.shape)
  return lax.dot_general(mats, y, (((2,), (1,)), ((0,), (0,))),
                         precision=lax.Precision.HIGHEST)


def conv_winograd(x: Array, kernel: Array, tile: int = 4,
                  preferred_element_type: jnp.dtype | None = None) -> Array:
  """Stride-1 SAME 3x3 convolution as Winograd's F(tile x tile, 3 x 3).

  The (tile + 2)^2 elementwise products of transformed tiles, summed over
  input channels, are one batched matmul of (a^2, tiles, C) by (a^2, C, O),
  a = tile + 2. The transforms B^T d B and A^T m A are written as small
  matmuls with the constant matrices (one over rows, one over columns) rather
  than as sums of slices: XLA's CPU backend runs dots on every core but loop
  fusions on one, and a fused sum of slices recomputes the row transform for
  every column. The kernel transform G g G^T is part of the graph, so the
  parameter stays the HWIO kernel and gradients flow back to it. Sides that
  are not a multiple of `tile` are padded up and cropped.

  bfloat16 and float16 inputs are computed in float32, the output rounded
  back: the terms of A^T m A are larger than their sum, so rounding the
  transformed operands multiplies the error (bf16, against float32: F(2x2)
  6.6e-3, F(4x4) 3.2e-2, lax.conv 2.9e-3; 4.9e-3 and 2.5e-2 with only the
  batched product in bf16). All-float32 has lax.conv's error and, on the CPU,
  whose bf16 dots are slower, is the fastest; GPU/TPU use lax.conv ('auto').

  Args:
    x: input, NHWC.
    kernel: HWIO kernel of spatial size 3x3.
    tile: output tile side, 2 or 4. F(4x4) does 2.25 multiplications per
      output and channel pair against F(2x2)'s 4, with larger transforms and
      an error of about 1e-5 relative in float32 (1e-6 for F(2x2)).
    preferred_element_type: the output's dtype; None = the common dtype of
      `x` and `kernel`. float32 for bf16 inputs skips one rounding, so that a
      bias can be added before the only one (`layers.Conv`).

  Returns:
    The NHWO output, in `preferred_element_type` or the common dtype.

  Raises:
    ValueError: for a tile other than 2 or 4, or a kernel that is not 3x3.
  """
  if tile not in _WINOGRAD:
    raise ValueError(f'conv_winograd: tile={tile!r} is not allowed: expected one of '
                     + ', '.join(map(str, TILES)))
  if kernel.shape[:2] != (3, 3):
    raise ValueError(f'conv_winograd: the kernel is {kernel.shape[0]}x{kernel.shape[1]}; '
                     "Winograd is implemented for 3x3 only (use conv_patches)")
  dtype = jnp.result_type(x, kernel)
  # float32 and wider compute as they are (an unchanged graph); narrower see above.
  work = jnp.promote_types(dtype, jnp.float32)
  x, kernel = x.astype(work), kernel.astype(work)
  bt, g, at = (jnp.asarray(mat, work) for mat in _WINOGRAD[tile])
  m, a = tile, tile + 2
  n, h, w, c = x.shape
  c_out = kernel.shape[-1]
  th, tw = -(-h // m), -(-w // m)  # Output tiles per column and per row.
  xp = jnp.pad(x, ((0, 0), (1, m * th - h + 1), (1, m * tw - w + 1), (0, 0)))
  # B^T d: the a rows of every tile (stride m), stacked first, times B^T.
  d = jnp.stack([lax.slice_in_dim(xp, r, r + m * (th - 1) + 1, m, axis=1) for r in range(a)])
  d = _left_mul(bt, d)  # (a_row, n, th, W, c)
  # (B^T d) B: the a columns of every tile, stacked second, times B^T per row.
  d = jnp.stack([lax.slice_in_dim(d, s, s + m * (tw - 1) + 1, m, axis=3) for s in range(a)],
                axis=1)  # (a_row, a_col, n, th, tw, c)
  v = _batched_left_mul(bt, d.reshape(a, a, -1)).reshape(a * a, n * th * tw, c)
  u = jnp.einsum('ir,js,rsco->ijco', g, g, kernel, precision=lax.Precision.HIGHEST)
  prod = lax.dot_general(v, u.reshape(a * a, c, c_out), (((2,), (1,)), ((0,), (0,))))
  # A^T prod A: columns first (per row), then rows.
  y = _left_mul(at, _batched_left_mul(at, prod.reshape(a, a, -1)))  # (m_row, m_col, ...)
  y = y.reshape(m, m, n, th, tw, c_out).transpose(2, 3, 0, 4, 1, 5)
  y = y.reshape(n, m * th, m * tw, c_out)[:, :h, :w]
  return y.astype(preferred_element_type or dtype)


def tile_for(input_shape: Sequence[int]) -> int | None:
  """The output tile side m of F(m x m, 3 x 3) for a layer's NHWC input; None: none repays.

  4 for >= MIN_CHANNELS input channels over >= MIN_TILES 4x4 output tiles,
  else 2 over >= MIN_TILES 2x2 tiles, else None.
  """
  n, h, w, c = input_shape
  if c < MIN_CHANNELS:
    return None
  for m in sorted(TILES, reverse=True):  # The largest that repays.
    if n * -(-h // m) * -(-w // m) >= MIN_TILES:
      return m
  return None
