"""Tests for vgg_flax.layers: both Conv lowerings agree, pooling, LRN."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vgg_flax import layers


def _conv_io(k, h, w, c_in=3, c_out=4, seed=0):
  kx, kk, kc = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(kx, (2, h, w, c_in))
  kernel = jax.random.normal(kk, (k, k, c_in, c_out)) / (k * np.sqrt(c_in))
  cotangent = jax.random.normal(kc, (2, h, w, c_out))
  return x, kernel, cotangent


@pytest.mark.parametrize('k', [1, 3, 5, 7])
@pytest.mark.parametrize('h,w', [(8, 8), (7, 9), (5, 6)])
def test_patches_equals_xla_outputs_and_gradients(k, h, w):
  x, kernel, cotangent = _conv_io(k, h, w)

  def loss(fn, x, kernel):
    return jnp.sum(fn(x, kernel) * cotangent)

  @jax.jit  # One compilation instead of dozens of eager slices.
  def outputs_and_grads(x, kernel):
    fns = (layers.conv_xla, layers.conv_patches) + ((layers.conv_winograd,) if k == 3 else ())
    return [(fn(x, kernel), jax.grad(loss, argnums=(1, 2))(fn, x, kernel)) for fn in fns]

  (y_xla, g_xla), *others = outputs_and_grads(x, kernel)
  for y, g in others:  # patches, and winograd for 3x3.
    assert y.shape == (2, h, w, 4)
    np.testing.assert_allclose(y, y_xla, rtol=1e-5, atol=1e-5)
    for a, b in zip(g, g_xla):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize('impl', ['xla', 'patches', 'winograd', 'auto'])
def test_conv_module_params_match_nn_conv(impl):
  x = jax.random.normal(jax.random.key(1), (2, 6, 6, 3))
  ours = layers.Conv(5, 3, impl=impl)
  ref = nn.Conv(5, (3, 3), padding='SAME')
  params = ours.init(jax.random.key(0), x)
  ref_params = ref.init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, ref_params)
  params = jax.tree.map(lambda p: p + 0.1, params)  # A non-zero bias.
  np.testing.assert_allclose(jax.jit(ours.apply)(params, x), jax.jit(ref.apply)(params, x),
                             rtol=1e-5, atol=1e-5)


def test_conv_bfloat16_computes_in_bf16_with_float32_params():
  x = jnp.ones((1, 4, 4, 2))
  conv = layers.Conv(3, 3, dtype=jnp.bfloat16, impl='patches')
  params = conv.init(jax.random.key(0), x)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  assert conv.apply(params, x).dtype == jnp.bfloat16


def test_auto_is_patches_on_cpu_winograd_where_it_pays_and_unknown_impl_fails():
  cpu = jax.default_backend() == 'cpu'
  assert layers.resolve_conv_impl('auto') == ('patches' if cpu else 'xla')
  assert layers.resolve_conv_impl('winograd', 3, min_side=8, in_channels=64) == 'winograd'
  # Small maps, few input channels and other kernel sizes take the patches.
  assert layers.resolve_conv_impl('winograd', 3, min_side=2) == 'patches'
  assert layers.resolve_conv_impl('winograd', 3, 32, in_channels=3) == 'patches'
  assert layers.resolve_conv_impl('winograd', 5) == 'patches'
  with pytest.raises(ValueError, match=r"Conv.impl='fft' is not allowed: expected one of "
                     r"'auto', 'xla', 'patches'"):
    layers.Conv(3, 3, impl='fft').init(jax.random.key(0), jnp.ones((1, 4, 4, 1)))


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
