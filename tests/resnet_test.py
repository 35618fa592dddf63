"""Tests for vgg_flax.models.resnet and its place in the zoo: counts, shapes, BatchNorm
gradients against the closed form, FLOPs, the config and a short training run."""

import functools
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vgg_flax import config as config_lib
from vgg_flax.interop import transfer
from vgg_flax.io import workdirs
from vgg_flax import models
from vgg_flax.models import flops
from vgg_flax.models import layers
from vgg_flax.models import resnet
from vgg_flax import summary
from vgg_flax import train
from vgg_flax.training import preflight
from vgg_flax.training import reporting

from helpers import tiny_config

# A tiny ResNet-50 for everything that computes: stage outputs 32-64-128-256.
TINY = dict(width=8)
EPS = 1e-5  # layers.batch_norm's epsilon (torchvision's).


def _shapes(model, shape):
  # eval_shape: the 25.6M parameters are never materialised.
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape)))


def _numpy_variables(model, shape, rng, dtype=np.float32):
  """Random variables for `model`, drawn in NumPy: compiling `init`'s RNG takes ~10 s."""
  draws = {
      'kernel': lambda s: rng.randn(*s) * np.sqrt(2 / np.prod(s[:-1])),  # He normal.
      'scale': lambda s: rng.uniform(0.5, 1.5, s),
      'bias': lambda s: 0.1 * rng.randn(*s),
      'mean': lambda s: 0.1 * rng.randn(*s),
      'var': lambda s: rng.uniform(0.5, 2.0, s),
  }
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: draws[path[-1].key](leaf.shape).astype(dtype), _shapes(model, shape))


def test_resnet50_param_count_matches_torchvision():
  # torchvision.models.resnet50(): sum(p.numel() for p in m.parameters()); checked
  # here against its layout rebuilt in plain torch 2.13 (also 53,120 BN statistics).
  variables = _shapes(resnet.resnet50(), (1, 224, 224, 3))
  assert models.count_params(variables['params']) == 25_557_032
  assert models.count_params(variables['batch_stats']) == 2 * 26_560
  # 10 classes and 1 channel: 990 fewer classifier rows and biases, and the
  # stem conv loses 2 of its 3 input channels.
  gray = _shapes(resnet.resnet50(num_classes=10), (1, 32, 32, 1))
  assert models.count_params(gray['params']) == (
      25_557_032 - 2048 * 990 - 990 - 64 * 7 * 7 * 2) == 23_522_250


def test_names_are_stable():
  params = _shapes(resnet.resnet50(**TINY), (1, 32, 32, 3))['params']
  assert {'stem_conv', 'stem_bn', 'predictions'} <= set(params)
  blocks = {'_'.join(n.split('_')[:2]) for n in params if n.startswith('stage')}
  assert blocks == {f'stage{s}_block{b}' for s, n in enumerate((3, 4, 6, 3), 1)
                    for b in range(1, n + 1)}
  # A projection only where the shape changes: the first block of each stage.
  assert sorted(n for n in params if n.endswith('proj_conv')) == [
      f'stage{s}_block1_proj_conv' for s in range(1, 5)]
  assert set(params['stage2_block1_conv2']) == {'kernel'}  # No conv biases.
  assert params['stage2_block1_conv2']['kernel'].shape == (3, 3, 16, 16)
  assert params['stage4_block3_conv3']['kernel'].shape == (1, 1, 64, 256)


@pytest.mark.parametrize('hw,channels,head,expected', [
    ((32, 32), 1, 'gap', (2, 10)),
    ((64, 48), 3, 'gap', (2, 10)),
    ((37, 45), 2, 'none', (2, 256)),
])
def test_output_shapes(hw, channels, head, expected):
  model = resnet.resnet50(num_classes=10, head=head, **TINY)
  x = jax.ShapeDtypeStruct((2, *hw, channels), jnp.float32)
  y = jax.eval_shape(lambda x: model.apply(model.init(jax.random.key(0), x), x), x)
  assert y.shape == expected and y.dtype == jnp.float32


def test_feature_map_sides_are_torchvisions():
  # Each stride-2 layer rounds up, like torchvision's padding k // 2: 224 -> 7.
  rows = summary.layer_rows(resnet.resnet50(**TINY), (1, 224, 200, 3))
  shapes = {r.name: r.output_shape for r in rows}
  assert shapes['stem_conv'] == (1, 112, 100, 8)
  assert shapes['stem_pool'] == (1, 56, 50, 8)
  assert shapes['stage2_block1_conv2'] == (1, 28, 25, 16)
  assert shapes['stage4_block3_bn3'] == (1, 7, 7, 256)
  assert shapes['predictions'] == (1, 1000)


def test_training_updates_batch_stats_and_bf16_runs():
  model = resnet.ResNet(stage_sizes=(1,), num_classes=5, **TINY)
  rng = np.random.RandomState(0)
  x = (3 * rng.randn(4, 32, 32, 1) + 1).astype(np.float32)
  variables = _numpy_variables(model, x.shape, rng)

  @jax.jit
  def run(variables, x):  # One compilation for the four modes.
    train_logits, updates = model.apply(variables, x, train=True, mutable=['batch_stats'])
    bf16 = model.clone(dtype=jnp.bfloat16).apply(variables, x)
    ref = model.clone(dtype=jnp.bfloat16, conv_impl='xla').apply(variables, x)
    return train_logits, updates, model.apply(variables, x), bf16, ref

  train_logits, updates, logits, logits_bf16, logits_ref = run(variables, x)
  old, new = variables['batch_stats']['stem_bn'], updates['batch_stats']['stem_bn']
  assert not np.allclose(old['mean'], new['mean']) and not np.allclose(old['var'], new['var'])
  # Inference normalises with the running statistics: another output.
  assert train_logits.shape == logits.shape == (4, 5)
  assert not np.allclose(train_logits, logits)
  assert logits_bf16.dtype == jnp.float32
  errors = [np.linalg.norm(np.asarray(y, np.float64) - logits) / np.linalg.norm(logits)
            for y in (logits_ref, logits_bf16)]
  # The bf16 model on lax.conv errs by the rounding of its layers (0.39 eps
  # here); the default lowering does no worse.
  assert 0 < errors[0] < jnp.finfo(jnp.bfloat16).eps, errors
  assert 0 < errors[1] <= 1.5 * errors[0], errors


@pytest.mark.parametrize('kwargs,message', [
    (dict(head='fc'), "ResNet.head='fc' is not allowed: expected one of 'gap', 'none'"),
    (dict(stage_sizes=(3, 4, 6, 3, 2)), r'ResNet.stage_sizes=\(3, 4, 6, 3, 2\) is not allowed'),
    (dict(stage_sizes=(3, 0)), r'ResNet.stage_sizes=\(3, 0\) is not allowed: 1 to 4 stages'),
    (dict(conv_impl='fft'), "ResNet.conv_impl='fft' is not allowed: expected one of 'auto'"),
    (dict(width=0), 'ResNet.width=0 is not allowed: must be >= 1'),
])
def test_bad_fields_fail_clearly(kwargs, message):
  with pytest.raises(ValueError, match=message):
    resnet.ResNet(**kwargs)


def test_wrong_ndim_fails_clearly():
  with pytest.raises(ValueError, match=r'ResNet expects NHWC images, got an input of shape '
                     r'\(32, 32, 3\)'):
    _shapes(resnet.resnet50(**TINY), (32, 32, 3))


def test_create_model_dispatches_on_the_name(tmp_path):
  config = tiny_config(tmp_path, **{'model.name': 'resnet50', 'model.dtype': 'bfloat16',
                                    'model.conv_impl': 'xla'})
  config_lib.validate(config)
  model = models.create_model(config.model, num_classes=10)
  assert isinstance(model, resnet.ResNet)
  assert (tuple(model.stage_sizes), model.width, model.num_classes) == ((3, 4, 6, 3), 8, 10)
  assert (model.dtype, model.conv_impl, model.head) == (jnp.bfloat16, 'xla', 'gap')
  assert isinstance(models.create_model(tiny_config(tmp_path).model, 10), models.VGG)

  config.model.name = 'resnet18'
  message = "config.model.name='resnet18' is not allowed: expected one of 'vgg', 'resnet50'"
  with pytest.raises(ValueError, match=message):
    models.create_model(config.model, num_classes=10)
  with pytest.raises(ValueError, match=message):
    config_lib.validate(config)


def _bn_backward(x, gamma, dy):
  """The closed-form batch-norm backward pass over the N, H, W axes."""
  axes = (0, 1, 2)
  m = x.shape[0] * x.shape[1] * x.shape[2]
  inv_std = 1 / np.sqrt(x.var(axes) + EPS)
  xhat = (x - x.mean(axes)) * inv_std
  dbeta, dgamma = dy.sum(axes), (dy * xhat).sum(axes)
  dx = gamma * inv_std / m * (m * dy - dbeta - xhat * dgamma)
  return dx, dgamma, dbeta


@pytest.mark.parametrize('dtype,rtol', [(np.float32, 1e-4), (np.float64, 1e-9)])
def test_batch_norm_gradients_match_the_closed_form(dtype, rtol):
  rng = np.random.RandomState(0)
  x = (2 * rng.randn(4, 5, 3, 6) + 1).astype(dtype)
  dy = rng.randn(*x.shape).astype(dtype)  # The upstream gradient: loss = sum(dy * y).
  params = {'scale': rng.uniform(0.5, 1.5, 6).astype(dtype), 'bias': rng.randn(6).astype(dtype)}
  stats = {'mean': rng.randn(6).astype(dtype), 'var': rng.uniform(0.5, 2, 6).astype(dtype)}
  with jax.enable_x64(dtype == np.float64):
    # The BatchNorm the models use, in training mode.
    bn = layers.batch_norm(train=True, dtype=dtype, param_dtype=dtype)()

    def loss(x, params):
      y, updates = bn.apply({'params': params, 'batch_stats': stats}, x,
                            mutable=['batch_stats'])
      return jnp.sum(y * dy), (y, updates['batch_stats'])

    (_, (y, new_stats)), (dx, dparams) = jax.jit(jax.value_and_grad(
        loss, argnums=(0, 1), has_aux=True))(x, params)

  atol = rtol * 10
  mu, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
  xhat = (x - mu) / np.sqrt(var + EPS)
  np.testing.assert_allclose(y, params['scale'] * xhat + params['bias'], rtol=rtol, atol=atol)
  # Running averages keep 0.9 of the old value (PyTorch's momentum=0.1); the
  # variance is the biased one (PyTorch stores the unbiased one).
  np.testing.assert_allclose(new_stats['mean'], 0.9 * stats['mean'] + 0.1 * mu, rtol=rtol)
  np.testing.assert_allclose(new_stats['var'], 0.9 * stats['var'] + 0.1 * var, rtol=rtol)
  want_dx, want_dgamma, want_dbeta = _bn_backward(x, params['scale'], dy)
  np.testing.assert_allclose(dx, want_dx, rtol=rtol, atol=atol)
  np.testing.assert_allclose(dparams['scale'], want_dgamma, rtol=rtol, atol=atol)
  np.testing.assert_allclose(dparams['bias'], want_dbeta, rtol=rtol, atol=atol)


def test_stem_kernel_gradient_through_batch_norm_matches_numpy():
  # The whole tiny network in float64 under jax.grad, against the chain rule by
  # hand for its first two layers: the 7x7 stride-2 stem conv (padding 3) and
  # stem_bn. jax supplies only the gradient arriving at stem_bn's output, read
  # off a zero added there.
  rng = np.random.RandomState(0)
  x = rng.randn(3, 12, 10, 2)
  with jax.enable_x64(True):
    model = resnet.ResNet(stage_sizes=(1,), num_classes=3, width=4, dtype=jnp.float64,
                          param_dtype=jnp.float64)
    variables = _numpy_variables(model, x.shape, rng, np.float64)
    params = variables['params']

    def loss(params, zero):
      def add_zero(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        return out + zero if context.module.name == 'stem_bn' else out
      with nn.intercept_methods(add_zero):
        logits, _ = model.apply({'params': params, 'batch_stats': variables['batch_stats']},
                                x, train=True, mutable=['batch_stats'])
      return jnp.sum(jnp.sin(logits))

    grads, dy = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, jnp.zeros((3, 6, 5, 4)))
    grads, dy = jax.tree.map(np.asarray, (grads, dy))

  kernel = np.asarray(params['stem_conv']['kernel'])
  xpad = np.pad(x, ((0, 0), (3, 3), (3, 3), (0, 0)))
  # Input pixel (2p + i, 2q + j) meets kernel tap (i, j) at output (p, q).
  patches = [[xpad[:, i:i + 12:2, j:j + 10:2] for j in range(7)] for i in range(7)]
  z = sum(patches[i][j] @ kernel[i, j] for i in range(7) for j in range(7))
  dz, dgamma, dbeta = _bn_backward(z, np.asarray(params['stem_bn']['scale']), dy)
  dkernel = np.stack([np.stack([np.einsum('npqc,npqo->co', patches[i][j], dz)
                                for j in range(7)]) for i in range(7)])
  np.testing.assert_allclose(grads['stem_bn']['scale'], dgamma, rtol=1e-9)
  np.testing.assert_allclose(grads['stem_bn']['bias'], dbeta, rtol=1e-9)
  np.testing.assert_allclose(grads['stem_conv']['kernel'], dkernel, rtol=1e-8, atol=1e-12)


def _traced_macs(model, shape):
  # Every conv and dense: output pixels x kernel size, from an abstract trace.
  macs = []

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if isinstance(context.module, (nn.Conv, layers.Conv, nn.Dense)):
      kernel = context.module.variables['params']['kernel']
      macs.append(int(np.prod(out.shape[1:-1])) * kernel.size)
    return out

  def init():
    with nn.intercept_methods(record):
      return model.init(jax.random.key(0), jnp.zeros(shape))

  jax.eval_shape(init)
  return sum(macs)


def test_flops():
  # fvcore's count for torchvision's resnet50 at 224 px (the published 4.09 GMACs).
  r50 = resnet.resnet50()
  assert flops.forward_flops(r50, 224) == 2 * 4_089_184_256 == 2 * _traced_macs(
      r50, (1, 224, 224, 3))
  assert flops.train_flops(r50, 224) == 3 * flops.forward_flops(r50, 224)
  tiny = resnet.resnet50(num_classes=10, **TINY)
  assert flops.forward_flops(tiny, 37, in_channels=1) == 2 * _traced_macs(tiny, (1, 37, 37, 1))
  features = resnet.resnet50(head='none', **TINY)
  assert flops.forward_flops(tiny, 32, 1) - flops.forward_flops(features, 32, 1) == 2 * 256 * 10


def test_summary_rows():
  rows = summary.layer_rows(resnet.resnet50(), (1, 224, 224, 3))
  assert rows[:3] == [('stem_conv', (1, 112, 112, 64), 7 * 7 * 3 * 64),
                      ('stem_bn', (1, 112, 112, 64), 2 * 64), ('stem_pool', (1, 56, 56, 64), 0)]
  assert rows[-2:] == [('avg_pool', (1, 2048), 0), ('predictions', (1, 1000), 2048 * 1000 + 1000)]
  assert sum(r.num_params for r in rows) == 25_557_032


def test_workdir_check_ignores_the_vgg_fields(tmp_path):
  workdir = str(tmp_path / 'run')
  os.makedirs(workdir)
  config = tiny_config(tmp_path, **{'model.name': 'resnet50'})
  with open(os.path.join(workdir, workdirs.CONFIG_FILE), 'w') as f:
    f.write(config.to_json_best_effort())
  preflight.check_workdir(workdir, tiny_config(tmp_path, **{'model.name': 'resnet50',
                                                        'model.depth': 19}))
  for change, diff in [({'model.width': 16}, 'model.width: 8 -> 16'),
                       ({'model.name': 'vgg'}, "model.name: 'resnet50' -> 'vgg'")]:
    with pytest.raises(ValueError, match=f'holds a run of a different model \\({diff}'):
      preflight.check_workdir(workdir, tiny_config(tmp_path, **{'model.name': 'resnet50',
                                                            **change}))


def test_weight_files_are_refused_for_resnet(tmp_path):
  path = tmp_path / 'resnet50.pth'
  path.write_bytes(b'')
  config = tiny_config(tmp_path, **{'model.name': 'resnet50'})
  with pytest.raises(ValueError, match=r"is a weights file, which vgg_flax converts for "
                     r"config.model.name='vgg' only; config.model.name='resnet50'"):
    transfer.read_variables(str(path), config.model)


def test_training_a_tiny_resnet50(tmp_path, monkeypatch, digits):
  # The trainer's own path (config, create_model, FLOPs, batch_stats, eval,
  # checkpoints) with one block per stage: ResNet-50's 16 blocks compile for
  # ~30 s more on 2 CPU cores and test nothing the trainer sees differently.
  monkeypatch.setattr(resnet, 'resnet50', functools.partial(resnet.ResNet,
                                                            stage_sizes=(1, 1, 1, 1)))
  workdir = str(tmp_path / 'run')
  config = tiny_config(digits, num_epochs=1, optimizer='sgd', learning_rate=0.05,
                       weight_decay=5e-4, **{'model.name': 'resnet50'})
  results = train.train_and_evaluate(config, workdir)
  rows = reporting.read_metrics(os.path.join(workdir, 'metrics.jsonl'))
  logged = [r for r in rows if 'train_loss' in r]
  assert [r['step'] for r in logged] == [10, 20]
  assert logged[-1]['train_loss'] < 0.8 * logged[0]['train_loss']
  assert logged[-1]['train_accuracy'] > 0.3  # Chance is 0.1.
  # After 20 steps the running BatchNorm statistics still lag: eval only runs.
  assert np.isfinite(results['eval_loss']) and results['eval_top5_accuracy'] > 0
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['model']['name'] == 'resnet50'
