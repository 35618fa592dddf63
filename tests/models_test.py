"""Tests for vgg_flax.models: parameter counts, shapes, names, errors, dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vgg_flax import config as config_lib
from vgg_flax import models
from vgg_flax.runtime import cpu

# Tiny models for everything that computes: channels 8-16-32-64-64.
TINY = dict(width=8, fc_dim=16)


def _param_shapes(model, shape=(1, 224, 224, 3)):
  # eval_shape: the full-size 138M-parameter models are never materialised.
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape)))


def _count(model, shape=(1, 224, 224, 3)):
  return models.count_params(_param_shapes(model, shape)['params'])


# torchvision.models.vgg*(): sum(p.numel() for p in m.parameters()) at 1000 classes
# (BatchNorm weight and bias, not the running statistics). Checked against
# torch 2.13 with torchvision's layout rebuilt in plain torch.nn.
@pytest.mark.parametrize('depth,batch_norm,expected', [
    (11, False, 132_863_336), (13, False, 133_047_848),
    (16, False, 138_357_544), (19, False, 143_667_240),
    (11, True, 132_868_840), (13, True, 133_053_736),
    (16, True, 138_365_992), (19, True, 143_678_248),
])
def test_param_count_matches_torchvision(depth, batch_norm, expected):
  assert _count(models.VGG(depth=depth, batch_norm=batch_norm)) == expected


# keras.applications.VGG16/VGG19(weights=None, include_top=False).count_params(),
# checked with keras 3.15 (KERAS_BACKEND=jax); the 1-channel figure with
# input_shape=(224, 224, 1): the first conv loses 2 * 9 * 64 weights.
@pytest.mark.parametrize('depth,channels,expected', [
    (16, 3, 14_714_688), (19, 3, 20_024_384), (16, 1, 14_714_688 - 2 * 9 * 64),
])
def test_param_count_without_top_matches_keras(depth, channels, expected):
  model = models.VGG(depth=depth, head='none')
  assert _count(model, (1, 224, 224, channels)) == expected


def test_paper_columns_a_lrn_and_c():
  assert _count(models.VGG(variant='A-LRN')) == _count(models.VGG(variant='A'))
  # C is D with the last conv of blocks 3, 4 and 5 at 1x1: 8 weights fewer per
  # input-output channel pair.
  one_by_one = 8 * (256 * 256 + 512 * 512 + 512 * 512)
  assert _count(models.VGG(variant='C')) == 138_357_544 - one_by_one == 133_638_952
  assert _count(models.VGG(variant='D')) == _count(models.VGG(depth=16))


def test_vgg16_names_are_stable():
  params = _param_shapes(models.vgg16())['params']
  expected = [f'block{b}_conv{i}' for b, n in enumerate((2, 2, 3, 3, 3), 1)
              for i in range(1, n + 1)] + ['fc1', 'fc2', 'predictions']
  assert list(params) == expected
  assert set(params['block1_conv1']) == {'kernel', 'bias'}
  variables = _param_shapes(models.vgg11(batch_norm=True))
  assert 'block3_bn2' in variables['params'] and 'block3_bn2' in variables['batch_stats']


@pytest.mark.parametrize('model_kwargs,hw,channels,expected', [
    (dict(depth=11), (32, 32), 3, (2, 10)),
    (dict(depth=16, head='gap'), (48, 48), 1, (2, 10)),
    (dict(depth=16, head='gap', gap_hidden_dim=16), (32, 64), 3, (2, 10)),
    (dict(depth=11, head='gap', pooling='max', hidden_dims=(12, 6, 4)), (64, 64), 1, (2, 10)),
    (dict(depth=11, hidden_dims=()), (64, 32), 3, (2, 10)),
    (dict(depth=13, hidden_dims=[24]), (32, 32), 3, (2, 10)),
    (dict(depth=11, head='none'), (64, 64), 3, (2, 2, 2, 64)),
    (dict(depth=11, head='none'), (32, 64), 1, (2, 1, 2, 64)),
    (dict(depth=16, head='none', pooling='avg'), (48, 48), 3, (2, 64)),
    (dict(depth=16, head='none', pooling='max'), (32, 64), 1, (2, 64)),
    (dict(variant='A-LRN'), (48, 32), 1, (2, 10)),
    (dict(variant='C', kernel_size=5), (32, 32), 3, (2, 10)),
    (dict(variant='C', kernel_size=1, head='none'), (64, 48), 3, (2, 2, 1, 64)),
    (dict(depth=19, batch_norm=True, kernel_size=5), (64, 32), 3, (2, 10)),
])
def test_output_shapes(model_kwargs, hw, channels, expected):
  model = models.VGG(num_classes=10, **TINY, **model_kwargs)
  x = jax.ShapeDtypeStruct((2, *hw, channels), jnp.float32)
  # Shapes only: eval_shape traces the model without computing it.
  y = jax.eval_shape(lambda x: model.apply(model.init(jax.random.key(0), x), x), x)
  assert y.shape == expected and y.dtype == jnp.float32


@pytest.mark.parametrize('kwargs,head_layers', [
    (dict(), [('fc1', 16), ('fc2', 16), ('predictions', 10)]),
    (dict(hidden_dims=(24, 12, 6)), [('fc1', 24), ('fc2', 12), ('fc3', 6), ('predictions', 10)]),
    (dict(hidden_dims=()), [('predictions', 10)]),
    (dict(head='gap', gap_hidden_dim=20), [('gap_hidden', 20), ('predictions', 10)]),
    (dict(head='gap', pooling='max', hidden_dims=(20, 5)),
     [('gap_hidden', 20), ('gap_hidden2', 5), ('predictions', 10)]),
])
def test_head_hidden_layers_are_named_in_order(kwargs, head_layers):
  model = models.VGG(depth=11, num_classes=10, **TINY | kwargs)
  params = _param_shapes(model)['params']
  assert [(n, params[n]['kernel'].shape[1]) for n in list(params)[8:]] == head_layers
  assert model.layer_names()[-len(head_layers):] == tuple(n for n, _ in head_layers)
  assert list(params)[:8] == [n for n in model.layer_names() if 'conv' in n]


def test_gap_head_pools_by_max_or_average():
  x = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
  avg = models.VGG(depth=11, num_classes=3, head='gap', hidden_dims=(6, 5), **TINY)
  variables = cpu.run_once(jax.jit(avg.init), jax.random.key(0), x)
  features = models.VGG(depth=11, head='none', **TINY).apply(variables, x)  # (2, 2, 2, 64).

  def head(pooled):
    for name in ('gap_hidden', 'gap_hidden2'):
      pooled = jax.nn.relu(pooled @ variables['params'][name]['kernel']
                           + variables['params'][name]['bias'])
    return pooled @ variables['params']['predictions']['kernel'] + variables['params'][
        'predictions']['bias']

  for pooling, reduce in (('', jnp.mean), ('max', jnp.max)):
    logits = avg.clone(pooling=pooling).apply(variables, x)
    np.testing.assert_allclose(logits, head(reduce(features, axis=(1, 2))), rtol=1e-5, atol=1e-6)


def test_fc1_input_is_the_flattened_feature_map():
  params = _param_shapes(models.VGG(**TINY), (1, 64, 96, 3))['params']
  assert params['fc1']['kernel'].shape == (2 * 3 * 64, 16)


def test_xla_patches_and_winograd_give_the_same_logits_and_bf16_runs():
  x = jax.random.normal(jax.random.key(1), (2, 36, 33, 3))
  xla = models.VGG(batch_norm=True, num_classes=5, conv_impl='xla', **TINY)
  patches = xla.clone(conv_impl='patches')
  winograd = xla.clone(conv_impl='winograd')
  variables = cpu.run_once(jax.jit(xla.init), jax.random.key(0), x)

  @jax.jit
  def train_logits(variables, x):
    return [m.apply(variables, x, train=True, mutable=['batch_stats'],
                    rngs={'dropout': jax.random.key(2)})[0] for m in (xla, patches, winograd)]

  logits, logits_p, logits_w = train_logits(variables, x)
  np.testing.assert_allclose(logits_p, logits, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(logits_w, logits, rtol=1e-4, atol=1e-4)

  bf16 = patches.clone(dtype=jnp.bfloat16)
  bf16_vars = cpu.run_once(jax.jit(bf16.init), jax.random.key(0), x)
  assert {p.dtype for p in jax.tree.leaves(bf16_vars)} == {jnp.dtype(jnp.float32)}

  @jax.jit
  def eval_logits(variables, bf16_vars, x):  # float32, bf16 lax.conv (the reference), bf16.
    return (xla.apply(variables, x), xla.clone(dtype=jnp.bfloat16).apply(variables, x),
            bf16.apply(bf16_vars, x))

  logits, logits_ref, logits_bf16 = eval_logits(variables, bf16_vars, x)
  assert logits_bf16.dtype == jnp.float32
  errors = [np.linalg.norm(np.asarray(y, np.float64) - logits) / np.linalg.norm(logits)
            for y in (logits_ref, logits_bf16)]
  # lax.conv's model in bf16 errs by the rounding of its layers (0.55 eps here):
  # computed in bf16, not float32. The lowering under test does no worse.
  assert 0 < errors[0] < jnp.finfo(jnp.bfloat16).eps, errors
  assert 0 < errors[1] <= 1.5 * errors[0], errors


def test_dropout_only_in_training():
  model = models.VGG(num_classes=4, conv_impl='xla', **TINY)  # lax.conv: a faster compile.
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  variables = cpu.run_once(jax.jit(model.init), jax.random.key(0), x)
  apply = jax.jit(model.apply, static_argnames='train')
  train = [apply(variables, x, train=True, rngs={'dropout': jax.random.key(s)}) for s in (1, 2)]
  assert not np.allclose(train[0], train[1])
  np.testing.assert_array_equal(apply(variables, x), apply(variables, x))


@pytest.mark.parametrize('kwargs,message', [
    (dict(depth=12), 'VGG.depth=12 is not allowed: expected one of 11, 13, 16, 19'),
    (dict(kernel_size=4), r'VGG.kernel_size=4 is not allowed: must be a positive odd integer'),
    (dict(kernel_size=0), r'VGG.kernel_size=0 is not allowed: must be a positive odd integer'),
    (dict(head='mlp'), "VGG.head='mlp' is not allowed: expected one of 'fc', 'gap', 'none'"),
    (dict(head='fc', pooling='avg'),
     "VGG.pooling='avg' is not allowed: only with head 'gap' or 'none'; the 'fc' head flattens"),
    (dict(hidden_dims=(8, 0)), r"VGG.hidden_dims=\(8, 0\) is not allowed: must be widths >= 1"),
    (dict(head='gap', gap_hidden_dim=8, hidden_dims=(8,)),
     r'VGG.hidden_dims=\(8,\) is not allowed: set it or gap_hidden_dim, not both'),
    (dict(variant='F'), "VGG.variant='F' is not allowed: expected one of '', 'A', 'A-LRN'"),
    (dict(conv_impl='fft'), "VGG.conv_impl='fft' is not allowed: expected one of 'auto'"),
])
def test_bad_fields_fail_clearly(kwargs, message):
  with pytest.raises(ValueError, match=message):
    models.VGG(**kwargs)


def test_small_image_fails_clearly():
  model = models.VGG(**TINY)
  with pytest.raises(ValueError, match='VGG halves the image five times; input is 32x16, '
                     'need at least 32x32'):
    jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.ones((1, 32, 16, 3))))


def test_create_model_from_config():
  config = config_lib.get_base_config().model
  config.depth, config.batch_norm, config.dtype, config.width = 11, True, 'bfloat16', 8
  model = models.create_model(config, num_classes=7)
  assert (model.depth, model.batch_norm, model.num_classes, model.width) == (11, True, 7, 8)
  assert model.dtype == jnp.bfloat16
  config.name = 'resnet'
  with pytest.raises(ValueError, match="config.model.name='resnet' is not allowed"):
    models.create_model(config, num_classes=7)
