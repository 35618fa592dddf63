"""Export to torchvision and Keras: strict loads that reproduce vgg_flax's outputs;
exact round trips."""

import math
import os

import jax
import numpy as np
import pytest

from vgg_flax.interop import hub
from vgg_flax.interop import weights
from vgg_flax.interop import weights_export
from vgg_flax import models
from vgg_flax.runtime import cpu

torch = pytest.importorskip('torch')
nn = torch.nn


def torchvision_vgg(variant='D', batch_norm=False, width=64, in_channels=3, fc_dim=4096,
                    num_classes=1000, seed=0):
  """torchvision.models.vgg's VGG and make_layers (torchvision is not installable here: the
  PyPI wheel is a CUDA build), with the channels, input channels and widths as arguments;
  `fc_dim` (a, b) gives the classifier's two hidden layers different widths."""
  fc1, fc2 = fc_dim if isinstance(fc_dim, tuple) else (fc_dim, fc_dim)
  cfg = []
  for kernels, channels in zip(models.CFGS[variant], models.BLOCK_CHANNELS):
    cfg += [max(1, channels * width // 64)] * len(kernels) + ['M']
  layers, c = [], in_channels
  for v in cfg:
    if v == 'M':
      layers += [nn.MaxPool2d(kernel_size=2, stride=2)]
    else:
      conv = nn.Conv2d(c, v, kernel_size=3, padding=1)
      layers += [conv, nn.BatchNorm2d(v), nn.ReLU(inplace=True)] if batch_norm else [
          conv, nn.ReLU(inplace=True)]
      c = v
  model = nn.Module()
  model.features = nn.Sequential(*layers)
  model.avgpool = nn.AdaptiveAvgPool2d((7, 7))
  model.classifier = nn.Sequential(
      nn.Linear(c * 7 * 7, fc1), nn.ReLU(True), nn.Dropout(p=0.5), nn.Linear(fc1, fc2),
      nn.ReLU(True), nn.Dropout(p=0.5), nn.Linear(fc2, num_classes))
  model.forward = lambda x: model.classifier(torch.flatten(model.avgpool(model.features(x)), 1))
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():  # He-scaled weights and non-trivial BN statistics.
    for m in model.modules():
      if isinstance(m, (nn.Conv2d, nn.Linear)):
        m.weight.normal_(0, math.sqrt(2 / m.weight[0].numel()), generator=g)
        m.bias.uniform_(-0.1, 0.1, generator=g)
      elif isinstance(m, nn.BatchNorm2d):
        m.weight.uniform_(0.5, 1.5, generator=g)
        m.bias.uniform_(-0.1, 0.1, generator=g)
        m.running_mean.normal_(0, 0.1, generator=g)
        m.running_var.uniform_(0.5, 2.0, generator=g)
  return model.eval()


def rel_error(ours, reference):
  ours, reference = np.asarray(ours), np.asarray(reference)
  assert ours.shape == reference.shape
  return float(np.abs(ours - reference).max() / np.abs(reference).max())


def torch_out(model, images_nchw):
  with torch.no_grad():
    return model(torch.from_numpy(images_nchw)).numpy()


@pytest.mark.parametrize('variant,width,fc_dim,size,rtol', [
    ('A', 8, 64, 224, 0.0), ('D', 16, 64, 32, 1e-5), ('E', 16, 64, 96, 1e-5),
    ('B', 8, (48, 24), 64, 1e-5)])
def test_torchvision_round_trip(variant, width, fc_dim, size, rtol):
  # torchvision -> vgg_flax -> torchvision. At 224 px every tensor comes back bit
  # for bit (tests/weights_test.py imports torchvision's full-width shapes). At 32 and 96 px vgg_flax's fc1 is folded
  # for the 1x1 / 3x3 map and spread back over AdaptiveAvgPool2d's 7x7: the same
  # function, other float32 sums over fc1's inputs.
  reference = torchvision_vgg(variant, width=width, fc_dim=fc_dim, seed=size)
  images = np.random.RandomState(size).randn(2, 3, size, size).astype(np.float32)
  model, variables = weights.convert_torchvision(reference.state_dict(), image_size=size)
  widths = fc_dim if isinstance(fc_dim, tuple) else (fc_dim, fc_dim)
  assert (model.cfg_name, model.width) == (variant, width)
  assert [w for _, w in model.hidden_layers()] == list(widths)
  state = weights_export.to_torchvision(model, variables, size)
  fresh = torchvision_vgg(variant, width=width, fc_dim=fc_dim, seed=size + 1)
  fresh.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
  error = rel_error(torch_out(fresh, images), torch_out(reference, images))
  print(f'VGG-{variant} width {width} at {size} px: round-trip relative error {error:.1e}')
  assert error <= rtol
  if size == 224:
    for name, value in reference.state_dict().items():
      np.testing.assert_array_equal(state[name], value.numpy(), err_msg=name)


def test_export_refuses_what_torchvision_cannot_express():
  with pytest.raises(weights_export.ExportError, match=r"model\.variant='C'"):
    weights_export.to_torchvision(models.VGG(variant='C'), {}, 224)
  with pytest.raises(weights_export.ExportError, match=r"model\.head='gap'"):
    weights_export.to_torchvision(models.VGG(head='gap'), {}, 224)
  with pytest.raises(weights_export.ExportError, match=r'model\.hidden_dims=\(8,\) has no '
                     'torchvision VGG: its classifier has two hidden Linear layers'):
    weights_export.to_torchvision(models.VGG(hidden_dims=(8,)), {}, 224)
  with pytest.raises(weights_export.ExportError, match=r'model\.kernel_size=5'):
    weights_export.keras_layers(models.VGG(kernel_size=5), {})
  kernel = np.zeros((9 * 9 * 8, 4), np.float32)
  with pytest.raises(weights.WeightImportError, match='image_size=288.*32 to 255'):
    weights_export.torchvision_fc1_from(kernel, 288)


def keras_module():
  os.environ.setdefault('KERAS_BACKEND', 'jax')
  return pytest.importorskip('keras')


def test_keras_round_trip_and_export_reproduce_outputs(tmp_path):
  keras = keras_module()
  keras.utils.set_random_seed(3)
  kwargs = dict(weights=None, input_shape=(32, 32, 1), classes=10, classifier_activation=None)
  source = keras.applications.VGG16(**kwargs)
  images = np.random.RandomState(0).rand(2, 32, 32, 1).astype(np.float32) * 255 - 120
  expected = keras.ops.convert_to_numpy(source(images))
  source.save_weights(tmp_path / 'source.weights.h5')
  model, variables = hub.load(tmp_path / 'source.weights.h5', conv_impl='xla')
  with jax.default_matmul_precision('highest'):
    ours = np.asarray(jax.jit(model.apply)(variables, images))
  assert rel_error(ours, expected) < 1e-5
  weights_export.save_keras_weights(model, variables, str(tmp_path / 'back.weights.h5'))
  back = keras.applications.VGG16(**kwargs)
  back.load_weights(tmp_path / 'back.weights.h5')
  assert rel_error(keras.ops.convert_to_numpy(back(images)), expected) < 1e-6


def test_keras_model_of_a_bn_gap_vgg_reproduces_outputs(tmp_path):
  keras = keras_module()
  model = models.VGG(depth=11, batch_norm=True, width=8, head='gap', gap_hidden_dim=16,
                     num_classes=5, conv_impl='xla')
  images = np.random.RandomState(1).randn(2, 32, 32, 3).astype(np.float32)
  rng = np.random.RandomState(2)  # He-scaled weights, non-trivial BN statistics.
  variables = jax.tree.map(lambda v: (rng.randn(*v.shape) * np.sqrt(2 / np.prod(v.shape[:-1]))
                                      if v.ndim > 1 else rng.uniform(0.5, 1.5, v.shape)
                                      ).astype(np.float32),
                           jax.eval_shape(model.init, jax.random.PRNGKey(0), images))
  with jax.default_matmul_precision('highest'):
    ours = np.asarray(model.apply(variables, images))
  weights_export.save_keras_model(model, variables, str(tmp_path / 'vgg.keras'), (32, 32, 3))
  loaded = keras.saving.load_model(tmp_path / 'vgg.keras')
  assert rel_error(keras.ops.convert_to_numpy(loaded(images)), ours) < 1e-5
  again, again_variables = hub.load(tmp_path / 'vgg.keras', conv_impl='xla')
  assert hub.model_fields(again) == hub.model_fields(model) | {'dropout_rate': 0.0}
  np.testing.assert_array_equal(again_variables['batch_stats']['block2_bn1']['var'],
                                variables['batch_stats']['block2_bn1']['var'])


def bn_vgg_with_small_variances(seed=0):
  """A tiny VGG-11-BN, its variables and images: random means, scales and offsets, and
  running variances of 1e-4 to 1e-2, where Keras' default epsilon (1e-3) and ours (1e-5)
  give the most different functions."""
  model = models.VGG(depth=11, batch_norm=True, width=4, fc_dim=16, num_classes=5,
                     dropout_rate=0.0, conv_impl='xla')
  images = np.random.RandomState(seed).randn(2, 32, 32, 3).astype(np.float32)
  variables = cpu.run_once(jax.jit(model.init), jax.random.PRNGKey(seed), images)
  rng = np.random.RandomState(seed + 1)
  params, stats = dict(variables['params']), {}
  for name, s in variables['batch_stats'].items():
    shape = s['var'].shape
    var = 10 ** rng.uniform(-4, -2, shape)
    stats[name] = {'mean': rng.randn(*shape) * 0.1, 'var': var}
    # Scales of about sqrt(var) keep every block's activations of order one.
    params[name] = {'scale': rng.uniform(0.5, 1.5, shape) * np.sqrt(var),
                    'bias': rng.uniform(-0.1, 0.1, shape)}
  variables = {'params': params, 'batch_stats': stats}
  return model, jax.tree.map(lambda v: np.asarray(v, np.float32), variables), images


def test_every_keras_file_round_trips_a_bn_vgg_with_small_variances(tmp_path):
  keras = keras_module()
  model, variables, images = bn_vgg_with_small_variances()
  with jax.default_matmul_precision('highest'):
    logits = np.asarray(model.apply(variables, images))
    for name in ('vgg.keras', 'vgg.h5', 'vgg.weights.h5'):
      path = str(tmp_path / name)
      if name.endswith('.weights.h5'):
        weights_export.save_keras_weights(model, variables, path)
      else:
        weights_export.save_keras_model(model, variables, path, (32, 32, 3))
      back, back_variables = hub.load(path, conv_impl='xla')
      assert hub.model_fields(back) == hub.model_fields(model), name
      error = rel_error(back.apply(back_variables, images), logits)
      print(f'{name}: relative error {error:.1e}')
      assert error < 1e-5, name
  # Keras itself, with BatchNormalization's default epsilon (all a weights-only file's
  # reader can assume), computes the same logits from the .weights.h5.
  inputs = keras.Input((32, 32, 3))
  x = inputs
  for cls, layer_name, cfg, _ in weights_export.keras_layers(model, variables):
    x = getattr(keras.layers, cls)(
        name=layer_name, **{k: v for k, v in cfg.items() if k != 'epsilon'})(x)
  reader = keras.Model(inputs, x)
  reader.load_weights(tmp_path / 'vgg.weights.h5')
  assert reader.get_layer('block1_bn1').epsilon == 1e-3
  error = rel_error(keras.ops.convert_to_numpy(reader(images)), logits)
  print(f'vgg.weights.h5 in Keras: relative error {error:.1e}')
  assert error < 1e-5
  # The whole-model .h5 is Keras' legacy HDF5 format (model_config), not a zip.
  with open(tmp_path / 'vgg.h5', 'rb') as f:
    assert f.read(8) == b'\x89HDF\r\n\x1a\n'
