"""Tests for vgg_flax.models.layers: the Conv lowerings agree, pooling, LRN."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vgg_flax.models import layers
from vgg_flax.models import winograd


def _conv_io(k, h, w, c_in=3, c_out=4, seed=0):
  kx, kk, kc = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(kx, (2, h, w, c_in))
  kernel = jax.random.normal(kk, (k, k, c_in, c_out)) / (k * np.sqrt(c_in))
  cotangent = jax.random.normal(kc, (2, h, w, c_out))
  return x, kernel, cotangent


@pytest.mark.parametrize('k', [1, 3, 5, 7])
@pytest.mark.parametrize('h,w', [(8, 8), (7, 9), (5, 6), (13, 4)])
def test_patches_and_winograd_equal_xla_outputs_and_gradients(k, h, w):
  x, kernel, cotangent = _conv_io(k, h, w)

  def loss(fn, x, kernel):
    return jnp.sum(fn(x, kernel) * cotangent)

  @jax.jit  # One compilation instead of dozens of eager slices.
  def outputs_and_grads(x, kernel):
    names = layers.LOWERINGS if k == 3 else ('xla', 'patches')
    fns = [layers.conv_fn(name) for name in names]  # 'xla' first: the reference.
    return [(fn(x, kernel), jax.grad(loss, argnums=(1, 2))(fn, x, kernel)) for fn in fns]

  (y_xla, g_xla), *others = outputs_and_grads(x, kernel)
  for y, g in others:  # patches, and Winograd F(2x2) and F(4x4) for 3x3.
    assert y.shape == (2, h, w, 4)
    np.testing.assert_allclose(y, y_xla, rtol=1e-5, atol=1e-5)
    for a, b in zip(g, g_xla):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float16])
def test_low_precision_lowerings_are_as_accurate_as_xla(dtype):
  # Winograd rounded to bf16/f16 in its transforms had 2.3x (F(2x2)) and 11x
  # (F(4x4)) lax.conv's error, whatever the size (issue 15). Small: compiling
  # the lowerings is what takes the time.
  x, kernel, _ = _conv_io(3, 8, 8, c_in=16, c_out=16)
  x = x[:1]
  ref = np.asarray(layers.conv_xla(x, kernel), np.float64)  # From the float32 inputs.

  @jax.jit
  def outputs(x, kernel):
    return [layers.conv_fn(name)(x.astype(dtype), kernel.astype(dtype))
            for name in layers.LOWERINGS]

  ys = outputs(x, kernel)
  assert all(y.dtype == dtype for y in ys)
  errors = {name: np.linalg.norm(np.asarray(y, np.float64) - ref) / np.linalg.norm(ref)
            for name, y in zip(layers.LOWERINGS, ys)}
  # lax.conv's own error is the rounding of its inputs and output.
  assert errors['xla'] < jnp.finfo(dtype).eps / 2
  bound = 1.5 * errors['xla']
  assert {name: f'{e:.1e}' for name, e in errors.items() if e > bound} == {}, (
      f'bound {bound:.1e}')


@pytest.mark.parametrize('impl', ['xla', 'patches', 'winograd', 'auto'])
# Shapes for which 'winograd' picks patches (3 channels), F(4x4) and F(2x2).
@pytest.mark.parametrize('shape', [(2, 6, 6, 3), (16, 16, 16, 16), (8, 12, 12, 16)])
def test_conv_module_params_match_nn_conv(impl, shape):
  x = jax.random.normal(jax.random.key(1), shape)
  ours = layers.Conv(5, 3, impl=impl)
  ref = nn.Conv(5, (3, 3), padding='SAME')
  params = ours.init(jax.random.key(0), x)
  ref_params = ref.init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, ref_params)
  params = jax.tree.map(lambda p: p + 0.1, params)  # A non-zero bias.
  # F(4x4)'s transforms (entries up to 8 and 1/24) cost about one more digit.
  np.testing.assert_allclose(jax.jit(ours.apply)(params, x), jax.jit(ref.apply)(params, x),
                             rtol=1e-5, atol=5e-5)


@pytest.mark.parametrize('impl', ['patches', 'winograd', 'auto', 'xla'])
def test_conv_bfloat16_adds_the_bias_before_its_one_rounding(impl):
  # The CPU lowerings accumulate in float32 and round once, after the bias:
  # as close to the float32 conv as rounding the inputs and output allows.
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 16))
  conv = layers.Conv(16, 3, impl=impl, dtype=jnp.bfloat16)
  params = conv.init(jax.random.key(1), x)
  params = jax.tree.map(lambda p: p + 0.3, params)  # A bias that is not zero.
  y = jax.jit(conv.apply)(params, x)
  assert y.dtype == jnp.bfloat16
  ref = layers.Conv(16, 3, impl='xla').apply(params, x)
  err = float(jnp.linalg.norm(y.astype(jnp.float32) - ref) / jnp.linalg.norm(ref))
  assert err < jnp.finfo(jnp.bfloat16).eps
  # Gradients reach the float32 parameters.
  grads = jax.grad(lambda p: jnp.sum(conv.apply(p, x).astype(jnp.float32)))(params)
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
  np.testing.assert_allclose(grads['params']['bias'], 2 * 8 * 8, rtol=1e-2)


@pytest.mark.parametrize('name', ['patches', 'winograd2', 'winograd4', 'xla'])
def test_lowerings_return_the_preferred_element_type(name):
  x, kernel, _ = _conv_io(3, 6, 6, c_in=4)
  y = layers.conv_fn(name)(x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16),
                           preferred_element_type=jnp.float32)
  assert y.dtype == jnp.float32
  assert layers.conv_fn(name)(x, kernel).dtype == jnp.float32


def test_conv_bfloat16_computes_in_bf16_with_float32_params():
  x = jnp.ones((1, 4, 4, 2))
  conv = layers.Conv(3, 3, dtype=jnp.bfloat16, impl='patches')
  params = conv.init(jax.random.key(0), x)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  assert conv.apply(params, x).dtype == jnp.bfloat16


def test_auto_is_winograd_on_cpu_with_tiles_chosen_per_layer_and_unknown_impl_fails():
  cpu = jax.default_backend() == 'cpu'
  assert layers.resolve_conv_impl('auto') == ('winograd4' if cpu else 'xla')
  # Asked for a platform (Conv asks for the CPU's branch of 'auto'), whatever this one is.
  for platform in ('tpu', 'cuda', 'rocm'):
    assert layers.resolve_conv_impl('auto', 3, (128, 32, 32, 64), platform) == 'xla'
  assert layers.resolve_conv_impl('auto', 3, (128, 32, 32, 64), 'cpu') == 'winograd4'
  assert layers.resolve_conv_impl('auto', 3, (128, 2, 2, 64), 'cpu') == 'patches'
  assert layers.resolve_conv_impl('patches', 3, (128, 32, 32, 64)) == 'patches'
  # VGG-16 at 32 px, batch 128: F(4x4) down to the 8 px maps (512 tiles), F(2x2)
  # on the 4 px maps (128 4x4 tiles, 512 2x2 tiles), patches on the 2 px maps.
  chosen = {side: layers.resolve_conv_impl('winograd', 3, (128, side, side, 256))
            for side in (32, 16, 8, 4, 2)}
  assert chosen == {32: 'winograd4', 16: 'winograd4', 8: 'winograd4', 4: 'winograd2',
                    2: 'patches'}
  # At 224 px, batch 8: the 14 px maps have 128 4x4 tiles, so F(2x2).
  assert layers.resolve_conv_impl('winograd', 3, (8, 28, 28, 512)) == 'winograd4'
  assert layers.resolve_conv_impl('winograd', 3, (8, 14, 14, 512)) == 'winograd2'
  # Few input channels (the first layer) and other kernel sizes take the patches.
  assert layers.resolve_conv_impl('winograd', 3, (128, 32, 32, 3)) == 'patches'
  assert layers.resolve_conv_impl('winograd', 5, (128, 32, 32, 64)) == 'patches'
  with pytest.raises(ValueError, match=r"Conv.impl='fft' is not allowed: expected one of "
                     r"'auto', 'xla', 'patches', 'winograd'"):
    layers.Conv(3, 3, impl='fft').init(jax.random.key(0), jnp.ones((1, 4, 4, 1)))


def test_conv_winograd_rejects_other_tiles_and_kernels():
  x = jnp.ones((1, 8, 8, 2))
  with pytest.raises(ValueError, match=r'tile=3 is not allowed: expected one of 2, 4'):
    winograd.conv_winograd(x, jnp.ones((3, 3, 2, 2)), tile=3)
  with pytest.raises(ValueError, match=r'the kernel is 5x5; Winograd is implemented for 3x3'):
    winograd.conv_winograd(x, jnp.ones((5, 5, 2, 2)))
  with pytest.raises(ValueError, match=r"lowering 'winograd3' is not allowed: expected one of "
                     r"'xla', 'patches', 'winograd4', 'winograd2'"):
    layers.conv_fn('winograd3')


@pytest.mark.parametrize('h,w', [(8, 8), (7, 7), (6, 9), (1, 5)])
def test_max_pool_2x2_equals_nn_max_pool(h, w):
  x = jax.random.normal(jax.random.key(0), (2, h, w, 3))
  expected = nn.max_pool(x, (2, 2), strides=(2, 2), padding='VALID')
  np.testing.assert_array_equal(layers.max_pool_2x2(x), expected)
  # The gradient goes to the max of each window, as with nn.max_pool.
  g = jax.grad(lambda a: layers.max_pool_2x2(a).sum())(x)
  g_ref = jax.grad(lambda a: nn.max_pool(a, (2, 2), strides=(2, 2)).sum())(x)
  np.testing.assert_array_equal(g, g_ref)


def test_local_response_norm_matches_the_alexnet_formula():
  x = jax.random.normal(jax.random.key(0), (2, 3, 3, 7)) * 10
  size, alpha, beta, k = 5, 1e-2, 0.75, 2.0
  a = np.asarray(x)
  expected = np.empty_like(a)
  for c in range(7):
    window = a[..., max(0, c - 2):min(7, c + 3)]
    expected[..., c] = a[..., c] / (k + alpha * np.sum(window ** 2, axis=-1)) ** beta
  got = layers.local_response_norm(x, size, alpha, beta, k)
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  np.testing.assert_allclose(layers.LocalResponseNorm(size, alpha, beta, k).apply({}, x),
                             expected, rtol=1e-5)


def test_global_pool():
  x = jax.random.normal(jax.random.key(0), (2, 3, 5, 4))
  np.testing.assert_allclose(layers.GlobalPool('avg').apply({}, x), x.mean(axis=(1, 2)),
                             rtol=1e-6)
  np.testing.assert_array_equal(layers.GlobalPool('max').apply({}, x), x.max(axis=(1, 2)))
