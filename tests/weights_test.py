"""Weight import: converted torchvision and Keras VGGs give the same logits."""

import math
import os

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vgg_flax.interop import keras_weights
from vgg_flax.interop import name_maps
from vgg_flax.interop import weights
from vgg_flax import models

RTOL = 1e-5  # max |ours - reference| / max |reference|, float32.


def rel_error(ours, reference):
  ours, reference = np.asarray(ours), np.asarray(reference)
  assert ours.shape == reference.shape
  return float(np.abs(ours - reference).max() / np.abs(reference).max())


def run_flax(model, variables, images_nhwc):
  with jax.default_matmul_precision('highest'):
    return np.asarray(jax.jit(model.apply)(variables, jnp.asarray(images_nhwc)))


def torch_vgg(depth, batch_norm=False, num_classes=1000):
  """torchvision's VGG layout (features / avgpool / classifier) in plain PyTorch."""
  torch = pytest.importorskip('torch')
  nn = torch.nn

  class TorchVGG(nn.Module):

    def __init__(self):
      super().__init__()
      layers, c = [], 3
      for kernels, ch in zip(models.CFGS[models.DEPTH_TO_VARIANT[depth]], models.BLOCK_CHANNELS):
        for _ in kernels:
          layers.append(nn.Conv2d(c, ch, 3, padding=1))
          if batch_norm:
            layers.append(nn.BatchNorm2d(ch))
          layers.append(nn.ReLU(inplace=True))
          c = ch
        layers.append(nn.MaxPool2d(2, 2))
      self.features = nn.Sequential(*layers)
      self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
      self.classifier = nn.Sequential(
          nn.Linear(512 * 7 * 7, 4096), nn.ReLU(True), nn.Dropout(),
          nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(), nn.Linear(4096, num_classes))

    def forward(self, x):
      return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))

  torch.set_num_threads(2)
  model = TorchVGG().eval()
  g = torch.Generator().manual_seed(depth)
  with torch.no_grad():  # He-scaled weights keep every layer's signal alive.
    for m in model.modules():
      if isinstance(m, (nn.Conv2d, nn.Linear)):
        m.weight.normal_(0, math.sqrt(2 / m.weight[0].numel()), generator=g)
        m.bias.uniform_(-0.1, 0.1, generator=g)
      elif isinstance(m, nn.BatchNorm2d):  # Non-trivial running statistics.
        m.weight.uniform_(0.5, 1.5, generator=g)
        m.bias.uniform_(-0.1, 0.1, generator=g)
        m.running_mean.normal_(0, 0.1, generator=g)
        m.running_var.uniform_(0.5, 2.0, generator=g)
  return model


# 224 px checks the NCHW flatten of classifier.0 as it is; 32 and 64 px check it
# through torchvision's AdaptiveAvgPool2d(7) (replicating a 1x1 or 2x2 map),
# folded into fc1 by torchvision_fc1_for, at a fraction of the cost.
@pytest.mark.parametrize('depth,batch_norm,size', [
    (11, False, 224), (13, False, 32), (16, False, 32), (19, False, 32),
    (16, True, 224), (13, True, 64)])
def test_torchvision_logits_match(depth, batch_norm, size):
  torch = pytest.importorskip('torch')
  reference_model = torch_vgg(depth, batch_norm)
  images = np.random.RandomState(depth).randn(2, 3, size, size).astype(np.float32)
  with torch.no_grad():
    reference = reference_model(torch.from_numpy(images)).numpy()
  variables = weights.from_torchvision(reference_model.state_dict(), depth, batch_norm)
  assert bool(variables['batch_stats']) == batch_norm
  if size != 224:
    variables = weights.torchvision_fc1_for(variables, size)
  model = models.VGG(depth=depth, batch_norm=batch_norm, num_classes=1000)
  logits = run_flax(model, variables, images.transpose(0, 2, 3, 1))  # NCHW -> NHWC.
  error = rel_error(logits, reference)
  print(f'VGG-{depth}{"-BN" if batch_norm else ""} at {size} px: relative error {error:.2e}')
  assert error < RTOL


def fake_state_dict(depth, batch_norm=False):
  """Right names and shapes, no memory (broadcast zeros): for the error paths."""
  shapes = name_maps.expected_shapes(depth, batch_norm, 1000)
  return {e.source: np.broadcast_to(np.float32(0), e.source_shape(shapes[(e.collection, e.path)]))
          for e in weights.torchvision_name_map(depth, batch_norm)}


def test_torchvision_file_of_another_depth_names_the_tensor():
  with pytest.raises(weights.WeightImportError, match=r"features\.\d+\.weight.*VGG-16.*VGG-11"):
    weights.from_torchvision(fake_state_dict(11), depth=16)


def test_torchvision_bn_file_without_batch_norm_is_rejected():
  with pytest.raises(weights.WeightImportError, match=r"unexpected tensor 'features\.1\.bias'"):
    weights.from_torchvision(fake_state_dict(11, batch_norm=True), depth=11)


def test_truncated_state_dict_names_the_missing_tensor():
  state = fake_state_dict(11)
  del state['classifier.3.bias']
  with pytest.raises(weights.WeightImportError, match=r"'classifier\.3\.bias' is missing"):
    weights.from_torchvision(state, depth=11)


def test_misshapen_tensor_names_both_shapes():
  state = fake_state_dict(11)
  state['features.3.weight'] = np.zeros((128, 32, 3, 3), np.float32)
  with pytest.raises(weights.WeightImportError,
                     match=r"'features\.3\.weight' has shape \(128, 32, 3, 3\).*\(128, 64, 3, 3\)"):
    weights.from_torchvision(state, depth=11)


def test_torchvision_files(tmp_path):
  torch = pytest.importorskip('torch')
  state = {'features.0.weight': torch.randn(4, 3, 3, 3), 'features.0.bias': torch.randn(4)}
  torch.save(state, tmp_path / 'w.pth')
  np.savez(tmp_path / 'w.npz', **{k: v.numpy() for k, v in state.items()})
  for name in ('w.pth', 'w.npz'):
    tensors, _ = weights.read_torchvision(tmp_path / name)
    np.testing.assert_array_equal(tensors['features.0.weight'], state['features.0.weight'].numpy())
  data = (tmp_path / 'w.pth').read_bytes()
  (tmp_path / 'cut.pth').write_bytes(data[:len(data) // 2])
  with pytest.raises(weights.WeightImportError, match='cut.pth is not a readable PyTorch file'):
    weights.read_torchvision(tmp_path / 'cut.pth')
  (tmp_path / 'w.txt').write_text('hello')
  with pytest.raises(weights.WeightImportError, match='unknown torchvision weights format'):
    weights.read_torchvision(tmp_path / 'w.txt')


def keras_module():
  # JAX unless keras was already imported in this process (by TensorFlow, under
  # pytest-xdist): the reference logits do not depend on the backend.
  os.environ.setdefault('KERAS_BACKEND', 'jax')
  return pytest.importorskip('keras')


def test_keras_logits_and_features_match(tmp_path):
  keras = keras_module()
  from keras.src.legacy.saving import legacy_h5_format  # pylint: disable=g-import-not-at-top
  images = np.random.RandomState(0).rand(2, 32, 32, 3).astype(np.float32) * 255 - 120
  for include_top in (True, False):
    keras.utils.set_random_seed(int(include_top))
    reference_model = keras.applications.VGG16(weights=None, include_top=include_top,
                                               input_shape=(32, 32, 3), classifier_activation=None)
    reference = keras.ops.convert_to_numpy(reference_model(images))
    # The layout of the Keras Applications downloads (legacy weights file) and
    # Keras 3's own .weights.h5.
    legacy = tmp_path / f'top{include_top}.h5'
    with h5py.File(legacy, 'w') as f:
      legacy_h5_format.save_weights_to_hdf5_group(f, reference_model)
    native = tmp_path / f'top{include_top}.weights.h5'
    reference_model.save_weights(native)
    model = (models.VGG(depth=16, num_classes=1000) if include_top
             else models.VGG(depth=16, head='none'))
    for path in (legacy, native):
      assert keras_weights.convert_keras(path)[0].depth == 16  # Read off the layers.
      variables = keras_weights.from_keras(path, depth=16)
      assert ('fc1' in variables['params']) == include_top
      error = rel_error(run_flax(model, variables, images), reference)
      print(f'Keras ({keras.backend.backend()}) VGG16 include_top={include_top} {path.name}: '
            f'relative error {error:.2e}')
      assert error < RTOL


def write_legacy_h5(path, layer_shapes):
  """A Keras-2-layout weights file with the given {layer: kernel shape}."""
  with h5py.File(path, 'w') as f:
    f.attrs['layer_names'] = [name.encode() for name in layer_shapes]
    for name, shape in layer_shapes.items():
      group = f.create_group(name)
      group.attrs['weight_names'] = [f'{name}/kernel:0'.encode(), f'{name}/bias:0'.encode()]
      group.create_dataset(f'{name}/kernel:0', data=np.zeros(shape, np.float32))
      group.create_dataset(f'{name}/bias:0', data=np.zeros(shape[-1:], np.float32))


def test_keras_errors(tmp_path):
  vgg19 = {name: (1, 1, 1, 1) for name in keras_weights.conv_layers(19)}
  write_legacy_h5(tmp_path / 'vgg19.h5', vgg19)
  with pytest.raises(weights.WeightImportError, match=r"'block3_conv4/(kernel|bias)'.*VGG-16.*VGG-19"):
    keras_weights.from_keras(tmp_path / 'vgg19.h5', depth=16)
  vgg16 = {name: (3, 3, 3 if name == 'block1_conv1' else 1, 64) for name in keras_weights.conv_layers(16)}
  del vgg16['block5_conv3']
  write_legacy_h5(tmp_path / 'short.h5', vgg16)
  with pytest.raises(weights.WeightImportError, match=r"'block5_conv3/kernel' is missing"):
    keras_weights.from_keras(tmp_path / 'short.h5', depth=16)
  vgg16['block5_conv3'] = (3, 3, 512, 512)
  write_legacy_h5(tmp_path / 'shapes.h5', vgg16)
  with pytest.raises(weights.WeightImportError,
                     match=r"'block1_conv2/kernel' has shape \(3, 3, 1, 64\).*\(3, 3, 64, 64\)"):
    keras_weights.from_keras(tmp_path / 'shapes.h5', depth=16)
  data = (tmp_path / 'shapes.h5').read_bytes()
  (tmp_path / 'cut.h5').write_bytes(data[:len(data) // 3])
  (tmp_path / 'text.h5').write_text('not hdf5')
  for name in ('cut.h5', 'text.h5'):
    with pytest.raises(weights.WeightImportError, match=f'{name} is not a readable HDF5 file'):
      keras_weights.from_keras(tmp_path / name, depth=16)
  with h5py.File(tmp_path / 'other.h5', 'w') as f:
    f['x'] = np.zeros(3)
  with pytest.raises(weights.WeightImportError, match='not a file Keras writes'):
    keras_weights.from_keras(tmp_path / 'other.h5', depth=16)


def test_adaptive_pool_matrix_matches_torch():
  torch = pytest.importorskip('torch')
  x = torch.randn(1, 1, 5)
  expected = torch.nn.AdaptiveAvgPool1d(7)(x)[0, 0].numpy()
  np.testing.assert_allclose(weights.adaptive_pool_matrix(5) @ x[0, 0].numpy(), expected,
                             rtol=1e-6)
