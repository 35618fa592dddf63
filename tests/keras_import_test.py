"""Any Keras VGG in: tutorial-style models in every format Keras writes load through
vgg_flax.load and give Keras' outputs; what does not fit is refused naming the layer."""

import os

import jax
import numpy as np
import pytest

from vgg_flax.interop import keras_weights
from vgg_flax.interop import weights
from vgg_flax.interop import weights_export
import vgg_flax

os.environ.setdefault('KERAS_BACKEND', 'jax')  # Unless TensorFlow imported it first.
keras = pytest.importorskip('keras')
L = keras.layers
FORMATS = ('.keras', '.h5', '.weights.h5')


def he_init(model, seed):
  """He-scaled weights and non-trivial BN statistics: every layer's signal stays alive."""
  rng = np.random.RandomState(seed)
  for layer in model.layers:
    values = layer.get_weights()
    if values:
      layer.set_weights([(rng.randn(*v.shape) * np.sqrt(2 / np.prod(v.shape[:-1]))
                          if v.ndim > 1 else rng.uniform(0.5, 1.5, v.shape)).astype(np.float32)
                         for v in values])
  return model


def sequential_fc(channels=3):
  """The Sequential tutorial VGG-16: default names, Flatten, 2 hidden Dense, softmax."""
  model = keras.Sequential([keras.Input((32, 32, channels))])
  for convs, width in zip((2, 2, 3, 3, 3), (8, 16, 32, 64, 64)):
    for _ in range(convs):
      model.add(L.Conv2D(width, 3, padding='same', activation='relu'))
    model.add(L.MaxPooling2D(padding='same'))
  model.add(L.Flatten())
  model.add(L.Dense(32, activation='relu'))
  model.add(L.Dropout(0.5))
  model.add(L.Dense(32, activation='relu'))
  model.add(L.Dense(10, activation='softmax'))
  return model


def functional_gap_bn(channels=1):
  """Functional VGG-11 with Conv-BN-ReLU, a GAP head and hidden Dense(120), Dense(60)."""
  inputs = keras.Input((48, 48, channels))
  x = inputs
  for convs, width in zip((1, 1, 2, 2, 2), (4, 8, 16, 32, 32)):
    for _ in range(convs):
      x = L.Activation('relu')(L.BatchNormalization()(L.Conv2D(width, 3, padding='same')(x)))
    x = L.MaxPooling2D()(x)
  x = L.Dropout(0.3)(L.GlobalAveragePooling2D()(x))
  x = L.Dense(60, activation='relu')(L.Dense(120, activation='relu')(x))
  return keras.Model(inputs, L.Dense(7)(x))


def functional_gmp_deep(channels=3):
  """Functional VGG-13 at 64 px: GlobalMaxPooling over the 2x2 map, two hidden Dense."""
  inputs = keras.Input((64, 64, channels))
  x = inputs
  for convs, width in zip((2, 2, 2, 2, 2), (4, 8, 16, 32, 32)):
    for _ in range(convs):
      x = L.Conv2D(width, 3, padding='same', activation='relu')(x)
    x = L.MaxPooling2D()(x)
  x = L.Dense(24, activation='relu')(L.GlobalMaxPooling2D()(x))
  x = L.Dense(16, activation='relu')(L.Dropout(0.2)(x))
  return keras.Model(inputs, L.Dense(6, activation='softmax')(x))


def sequential_flatten_one(channels=1):
  """Sequential grayscale VGG-19 at 64 px: Flatten over the 2x2 map, one hidden Dense."""
  model = keras.Sequential([keras.Input((64, 64, channels))])
  for convs, width in zip((2, 2, 4, 4, 4), (4, 8, 16, 32, 32)):
    for _ in range(convs):
      model.add(L.Conv2D(width, 3, padding='same'))
      model.add(L.ReLU())
    model.add(L.MaxPooling2D())
  model.add(L.Flatten())
  model.add(L.Dense(40, activation='relu'))
  model.add(L.Dense(10))
  return model


def applications_notop(channels=1):
  """keras.applications.VGG19 without top, grayscale, pooling='max'."""
  return keras.applications.VGG19(weights=None, include_top=False, pooling='max',
                                  input_shape=(32, 32, channels))


CASES = {'sequential_fc': (sequential_fc, 3, {}),
         # Three Dense layers read as Flatten-fc1-fc2 unless the file says otherwise.
         'functional_gap_bn': (functional_gap_bn, 1, {'head': 'gap'}),
         'functional_gmp_deep': (functional_gmp_deep, 3, {'head': 'gap', 'pooling': 'max'}),
         'sequential_flatten_one': (sequential_flatten_one, 1, {}),
         'vgg19_notop_max': (applications_notop, 1, {'pooling': 'max'})}
# What each case is in vgg_flax, and what a weights-only file needs told (overrides).
EXPECTED = {'sequential_fc': dict(depth=16, width=8, head='fc', fc_dim=32, num_classes=10),
            'functional_gap_bn': dict(depth=11, width=4, head='gap', hidden_dims=(120, 60),
                                      batch_norm=True, num_classes=7),
            'functional_gmp_deep': dict(depth=13, width=4, head='gap', pooling='max',
                                        hidden_dims=(24, 16), num_classes=6),
            'sequential_flatten_one': dict(depth=19, width=4, head='fc', hidden_dims=(40,),
                                           num_classes=10),
            'vgg19_notop_max': dict(depth=19, width=64, head='none', pooling='max')}


@pytest.fixture(scope='module', params=sorted(CASES))
def saved(request, tmp_path_factory):
  """A Keras model saved in every format, its outputs, and its input images."""
  build, channels, _ = CASES[request.param]
  keras.utils.set_random_seed(0)
  model = he_init(build(channels), seed=1)
  size = model.input_shape[1]
  images = np.random.RandomState(2).rand(2, size, size, channels).astype(np.float32) * 2 - 1
  folder = tmp_path_factory.mktemp(request.param)
  model.save(folder / 'model.keras')
  model.save(folder / 'model.h5')
  model.save_weights(folder / 'model.weights.h5')
  return request.param, folder, model, images, keras.ops.convert_to_numpy(model(images))


def rel_error(ours, reference):
  return float(np.abs(np.asarray(ours) - reference).max() / np.abs(reference).max())


def test_every_format_loads_and_matches_keras(saved):
  name, folder, keras_model, images, expected = saved
  apply = None
  for suffix in FORMATS:
    overrides = CASES[name][2] if suffix == '.weights.h5' else {}  # No config: say the pooling.
    # lax.conv compiles faster than the CPU's Winograd lowering: same parameters.
    model, variables = vgg_flax.load(folder / f'model{suffix}', conv_impl='xla', **overrides)
    for field, value in EXPECTED[name].items():
      assert getattr(model, field) == value, (suffix, field)
    if apply is None:  # One compilation per case: the formats give the same model.
      apply = jax.jit(model.apply)
    with jax.default_matmul_precision('highest'):
      ours = apply(variables, images)
    if keras_model.layers[-1].get_config().get('activation') == 'softmax':
      ours = jax.nn.softmax(ours)  # vgg_flax returns logits.
    error = rel_error(ours, expected)
    print(f'{name}{suffix}: relative error {error:.1e}')
    assert error < 1e-5, suffix


@pytest.mark.parametrize('saved', ['vgg19_notop_max'], indirect=True)
def test_named_features_equal_keras_layer_outputs(saved):
  _, folder, keras_model, images, _ = saved
  layers = ('block1_conv2', 'block2_conv2', 'block3_conv4', 'block4_conv4')
  extractor = keras.Model(keras_model.inputs, [keras_model.get_layer(n).output for n in layers])
  expected = [keras.ops.convert_to_numpy(x) for x in extractor(images)]
  model, variables = vgg_flax.load(folder / 'model.keras', conv_impl='xla')
  extract = jax.jit(lambda v, x: vgg_flax.features(model, v, x, layers))
  with jax.default_matmul_precision('highest'):
    ours = extract(variables, images)
  assert set(ours) == set(layers)
  for layer, reference in zip(layers, expected):
    assert rel_error(ours[layer], reference) < 1e-5, layer
  # Layers after the last one asked for are not computed: they need no weights.
  del variables['params']['block5_conv1']
  assert vgg_flax.features(model, variables, images, ('block2_conv2',))['block2_conv2'].shape == (
      2, 16, 16, 128)
  with pytest.raises(ValueError, match=r"unknown layer 'block6_conv1'.*block1_conv1, "
                                       r'block1_conv2, block1_pool'):
    vgg_flax.features(model, variables, images, ('block6_conv1',))


def not_a_vgg(tmp_path, build, name='bad.keras'):
  keras.utils.set_random_seed(0)
  inputs = keras.Input((64, 64, 3))
  model = keras.Model(inputs, build(inputs))
  model.save(tmp_path / name)
  return tmp_path / name


def vgg_blocks(x, first=None):
  for b, width in enumerate((4, 8, 16, 32, 32)):
    x = (first or L.Conv2D(width, 3, padding='same', activation='relu'))(x) if b == 0 else (
        L.Conv2D(width, 3, padding='same', activation='relu')(x))
    x = L.MaxPooling2D()(x)
  return x


@pytest.mark.parametrize('build,message', [
    (lambda x: L.Add(name='add')([L.Conv2D(3, 3, padding='same')(x), x]),
     r"layer 'add' \(Add\) has 2 inputs"),
    (lambda x: vgg_blocks(x, L.Conv2D(4, 3, strides=2, padding='same', activation='relu',
                                      name='strided')),
     r"layer 'strided' \(Conv2D\) has strides=\[2, 2\]"),
    (lambda x: vgg_blocks(x, L.Conv2D(4, 3, padding='valid', activation='relu', name='valid')),
     r"layer 'valid' \(Conv2D\) has padding='valid'"),
    (lambda x: L.Dense(3)(L.BatchNormalization(name='head_bn')(
        L.GlobalAveragePooling2D()(vgg_blocks(x)))),
     r"layer 'head_bn' \(BatchNormalization\) is not between a conv"),
])
def test_what_is_not_a_plain_vgg_is_refused_naming_the_layer(tmp_path, build, message):
  with pytest.raises(weights.WeightImportError, match=message):
    vgg_flax.load(not_a_vgg(tmp_path, build))


def test_file_errors(tmp_path):
  (tmp_path / 'text.keras').write_text('not a model')
  with pytest.raises(weights.WeightImportError, match='text.keras is not a readable HDF5'):
    vgg_flax.load(tmp_path / 'text.keras')
  with pytest.raises(FileNotFoundError, match='missing.h5 does not exist'):
    vgg_flax.load(tmp_path / 'missing.h5')
  # Legacy weights file by Keras Applications names, as the ImageNet downloads.
  assert keras_weights.conv_layers(11)[-1] == 'block5_conv2'


@pytest.mark.parametrize('saved', ['functional_gmp_deep'], indirect=True)
def test_a_deep_global_max_head_goes_back_to_keras(saved, tmp_path):
  _, folder, _, images, expected = saved
  model, variables = vgg_flax.load(folder / 'model.h5', conv_impl='xla')
  back = weights_export.keras_model(model, variables, images.shape[1:])
  assert [type(layer).__name__ for layer in back.layers[-4:]] == [
      'GlobalMaxPooling2D', 'Dense', 'Dense', 'Dense']
  # vgg_flax and the export give logits; the source ends in a softmax.
  assert rel_error(jax.nn.softmax(keras.ops.convert_to_numpy(back(images))), expected) < 1e-5
