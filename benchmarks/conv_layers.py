"""Forward + backward time of one conv layer per lowering, at VGG-16's layer shapes.

  python benchmarks/conv_layers.py --workload=32x128 --torch
  python benchmarks/conv_layers.py --workload=224x8 --lowerings=patches,winograd4

For each distinct 3x3 layer shape of VGG-16 at the workload's image size and
batch, it times a jitted `grad` of sum(sin(conv(x, k))) with respect to input
and kernel (the forward and both backward products of a training step) for
each `vgg_flax.models.layers` lowering, and with --torch the same for PyTorch's
`nn.Conv2d` (NCHW). Each entry is the median of --reps calls. It also prints
the largest difference of each lowering's output from `lax.conv`'s, relative
to the output's largest magnitude. This is how the per-layer choice of
`layers.resolve_conv_impl` was made; see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from vgg_flax.models import layers

# VGG-16's 3x3 layers as (side divisor, in channels, out channels): one per
# distinct shape (block1's first layer reads the 3 image channels).
VGG16_LAYERS = ((1, 3, 64), (1, 64, 64), (2, 128, 128), (4, 256, 256), (8, 512, 512),
                (16, 512, 512))


def _median_seconds(fn, reps: int) -> float:
  fn()  # Compile / warm up.
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def time_lowering(name: str, x: jax.Array, kernel: jax.Array, reps: int) -> tuple[float, float]:
  """(seconds of forward + backward, max error relative to lax.conv) of one lowering."""
  conv = layers.conv_fn(name)
  grad = jax.jit(jax.grad(lambda x, k: jnp.sum(jnp.sin(conv(x, k))), argnums=(0, 1)))
  seconds = _median_seconds(lambda: jax.block_until_ready(grad(x, kernel)), reps)
  ref = jax.jit(layers.conv_xla)(x, kernel)
  err = jnp.max(jnp.abs(jax.jit(conv)(x, kernel) - ref)) / jnp.max(jnp.abs(ref))
  return seconds, float(err)


def time_torch(n: int, side: int, c_in: int, c_out: int, reps: int) -> float:
  import torch  # pylint: disable=g-import-not-at-top
  x = torch.randn(n, c_in, side, side, requires_grad=True)
  conv = torch.nn.Conv2d(c_in, c_out, 3, padding=1)

  def step():
    x.grad = None
    conv.zero_grad(set_to_none=True)
    torch.sin(conv(x)).sum().backward()
  return _median_seconds(step, reps)


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--workload', default='32x128', help='IMAGE_SIZExBATCH.')
  p.add_argument('--lowerings', default='xla,patches,winograd2,winograd4',
                 help='Comma-separated: ' + ', '.join(layers.LOWERINGS))
  p.add_argument('--reps', type=int, default=5)
  p.add_argument('--width', type=int, default=64,
                 help='Channels of block 1; the others scale with it (64 = VGG-16).')
  p.add_argument('--torch', action='store_true', help="Time PyTorch's Conv2d too.")
  args = p.parse_args(argv)
  size, n = (int(v) for v in args.workload.split('x'))
  names = args.lowerings.split(',')
  unknown = sorted(set(names) - set(layers.LOWERINGS))
  if unknown:
    p.error(f'--lowerings: unknown {unknown}; allowed: {", ".join(layers.LOWERINGS)}')
  cols = names + (['torch'] if args.torch else [])
  print(f'VGG-16 (width {args.width}) 3x3 layers at {size} px, batch {n}: forward + backward, ms '
        f'(max error relative to lax.conv)')
  print('| layer | ' + ' | '.join(cols) + ' | auto picks |')
  print('|---' * (len(cols) + 2) + '|')
  key = jax.random.key(0)
  for divisor, c_in, c_out in VGG16_LAYERS:
    side = size // divisor
    # Scaled like models.VGG's `width`; the image's 3 channels stay 3.
    c_in, c_out = (c if c == 3 else max(1, c * args.width // 64) for c in (c_in, c_out))
    kx, kk = jax.random.split(jax.random.fold_in(key, divisor * c_in))
    x = jax.random.normal(kx, (n, side, side, c_in))
    kernel = jax.random.normal(kk, (3, 3, c_in, c_out)) / (3 * np.sqrt(c_in))
    cells = []
    for name in names:
      seconds, err = time_lowering(name, x, kernel, args.reps)
      cells.append(f'{seconds * 1e3:.0f} ({err:.0e})')
    if args.torch:
      cells.append(f'{time_torch(n, side, c_in, c_out, args.reps) * 1e3:.0f}')
    picked = layers.resolve_conv_impl('winograd', 3, x.shape)
    print(f'| {side} px, {c_in}->{c_out} | ' + ' | '.join(cells) + f' | {picked} |', flush=True)


if __name__ == '__main__':
  main()
