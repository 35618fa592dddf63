"""Transfer learning: init_from with dont_load, and frozen parameters."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow as tf

from vgg_flax.config import get_base_config
from vgg_flax.data import input_pipeline
from vgg_flax.interop import transfer
from vgg_flax import models
from vgg_flax.runtime import cpu
from vgg_flax import train
from vgg_flax.training import optim
from vgg_flax.training import step as step_lib

from helpers import override


def tiny_config(**overrides):
  config = get_base_config()
  config.model.depth = 11
  config.model.width = 8
  config.model.fc_dim = 16
  config.model.dropout_rate = 0.0
  config.image_size = 32
  config.input.scale_min = config.input.scale_max = config.input.eval_resize = 32
  config.batch_size = 8
  config.num_epochs = 1
  config.learning_rate = 1e-2
  config.schedule.name = 'constant'
  return override(config, **overrides)


def randomised(variables, seed):
  """`variables` with every leaf drawn at random (variances positive), as numpy.

  Stands in for trained weights: the initial BatchNorm scale, bias, mean and
  variance (ones and zeros) are the same in every fresh model, so a loader
  that kept the fresh ones would pass a comparison with them.
  """
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: (0.5 + rng.random(x.shape)).astype(x.dtype),
                      jax.device_get(variables))


@functools.cache
def init_variables(num_classes=10, batch_norm=False, seed=0, head='fc'):
  model = models.VGG(depth=11, width=8, fc_dim=16, num_classes=num_classes,
                     batch_norm=batch_norm, head=head)
  v = cpu.run_once(jax.jit(model.init), jax.random.PRNGKey(seed), jnp.zeros((1, 32, 32, 3)))
  return {'params': v['params'], 'batch_stats': v.get('batch_stats', {})}


@pytest.mark.parametrize('optimizer,states_per_param', [('adamw', 2), ('sgd', 1)])
def test_frozen_parameters_are_bit_identical_and_have_no_optimizer_state(
    optimizer, states_per_param):
  config = tiny_config(optimizer=optimizer, freeze=('block1', 'fc2/kernel'))
  model = models.create_model(config.model, 10)
  tx, lr_fn = optim.create_optimizer(config, steps_per_epoch=10)
  tx = transfer.freeze(tx, config)
  mesh = step_lib.create_mesh()
  state = step_lib.create_train_state(model, tx, config, 3,
                                   jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  before = jax.device_get(transfer.flatten(state.params))
  frozen = {p for p in before if p.startswith('block1_') or p == 'fc2/kernel'}
  assert frozen == {'block1_conv1/kernel', 'block1_conv1/bias', 'fc2/kernel'}
  rng = np.random.RandomState(0)
  step = jax.jit(functools.partial(step_lib.train_step, learning_rate_fn=lr_fn, label_smoothing=0.0))
  for _ in range(3):
    batch = {'image': rng.randn(8, 32, 32, 3).astype(np.float32),
             'label': rng.randint(0, 10, 8).astype(np.int32)}
    state, _ = step(state, batch)
  after = jax.device_get(transfer.flatten(state.params))
  for path in before:
    if path in frozen:
      np.testing.assert_array_equal(after[path], before[path], err_msg=path)
    else:
      assert not np.array_equal(after[path], before[path]), path
  trainable = sum(before[p].size for p in before if p not in frozen)
  state_size = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
  assert state_size == states_per_param * trainable


def test_freeze_errors():
  params = init_variables()['params']
  with pytest.raises(ValueError, match=r"config.freeze entry 'block9' matches no parameter"):
    transfer.freeze_labels(params, ('block9',))
  with pytest.raises(ValueError, match=r"config.freeze entry 'block\[1' is not a valid regex"):
    transfer.freeze_labels(params, ('block[1',))


def test_loading_another_number_of_classes_needs_the_head_excluded():
  source, target = init_variables(1000, seed=1), init_variables(5, seed=2)
  with pytest.raises(ValueError, match=r'cannot load predictions/(kernel|bias): .*\(1000,\).*'
                     r'\(5,\).*--config.dont_load=\'\("predictions",\)\''):
    transfer.merge_variables(target, source)
  merged, loaded = transfer.merge_variables(target, source, dont_load=('predictions',))
  flat_m, flat_s, flat_t = (transfer.flatten(v['params']) for v in (merged, source, target))
  assert len(loaded) == len(flat_t) - 2
  for path in flat_t:
    expected = flat_t[path] if path.startswith('predictions/') else flat_s[path]
    np.testing.assert_array_equal(flat_m[path], expected, err_msg=path)


def test_missing_and_mismatched_sources_are_errors():
  target = init_variables()
  source = init_variables(head='gap')  # No fc1/fc2: the model needs them.
  with pytest.raises(ValueError, match=r'lacks 4 tensors of the model: fc1/bias, fc1/kernel'):
    transfer.merge_variables(target, source, dont_load=('predictions',))
  # A BN source into a model without BN would silently drop its statistics.
  with pytest.raises(ValueError, match=r'backbone tensors the model does not use: block1_bn1'):
    transfer.merge_variables(target, init_variables(batch_norm=True))
  # A gap model from an fc source: fc1/fc2 are unused, which is fine.
  merged, _ = transfer.merge_variables(init_variables(head='gap'), target,
                                       dont_load=('predictions',))
  assert 'fc1' not in merged['params']
  with pytest.raises(ValueError, match=r"dont_load entry 'head' matches no parameter"):
    transfer.merge_variables(target, target, dont_load=('head',))


def test_converted_folder_round_trip(tmp_path):
  variables = randomised(init_variables(batch_norm=True), seed=5)
  transfer.save_converted(variables, str(tmp_path / 'w'), {'source': 'test'})
  config = tiny_config()
  config.model.batch_norm = True
  restored = transfer.read_variables(str(tmp_path / 'w'), config.model)
  jax.tree.map(np.testing.assert_array_equal, restored, variables)
  with pytest.raises(FileNotFoundError, match='config.init_from=.*nowhere.*is not a training'):
    transfer.read_variables(str(tmp_path / 'nowhere'), config.model)


def test_training_starts_from_init_from_and_keeps_frozen_blocks(tmp_path, digits):
  data = digits
  base = dict(dataset='digits', data_dir=data, **{'input.normalization': 'mean_std',
              'input.mean': (77.7,), 'input.std': (82.5,), 'input.flip': False,
              'batch_size': 32, 'optimizer': 'adam', 'learning_rate': 3e-3,
              'log_every_steps': 20, 'input.cache': True, 'input.shuffle_buffer': 256})
  first = str(tmp_path / 'first')
  train.train_and_evaluate(tiny_config(**base), first)
  second = str(tmp_path / 'second')
  train.train_and_evaluate(tiny_config(**base, init_from=first, freeze=('block1',),
                                       dont_load=('predictions',), seed=3), second)
  source = transfer.restore_checkpoint_variables(transfer.find_checkpoint(first))['params']
  tuned = transfer.restore_checkpoint_variables(transfer.find_checkpoint(second))['params']
  np.testing.assert_array_equal(tuned['block1_conv1']['kernel'], source['block1_conv1']['kernel'])
  assert not np.array_equal(tuned['block2_conv1']['kernel'], source['block2_conv1']['kernel'])


@pytest.mark.parametrize('preset,expected', [
    ('torchvision', [(10 / 255 - 0.485) / 0.229, (20 / 255 - 0.456) / 0.224,
                     (30 / 255 - 0.406) / 0.225]),
    ('caffe', [30 - 103.939, 20 - 116.779, 10 - 123.68]),
    ('', [10 - 123.675, 20 - 116.28, 30 - 103.53])])
def test_normalization_presets(preset, expected):
  config = get_base_config()
  config.input.preset = preset
  image = tf.constant([[[10, 20, 30]]], tf.uint8)
  np.testing.assert_allclose(input_pipeline.normalize(image, config).numpy()[0, 0], expected,
                             rtol=1e-5)
  if preset:
    with pytest.raises(input_pipeline.DataError, match='needs RGB images'):
      input_pipeline.normalize(tf.zeros((4, 4, 1), tf.uint8), config)


@pytest.mark.parametrize('depth', [13, 19])
def test_net_a_initialises_the_shared_layers_of_a_deeper_net(tmp_path, depth):
  # A trained net A (random weights stand in for training), saved as init_from reads it.
  net_a = models.VGG(depth=11, width=8, fc_dim=16, num_classes=10, batch_norm=True)
  a = randomised(jax.eval_shape(net_a.init, jax.random.PRNGKey(7), jnp.zeros((1, 32, 32, 3))),
                 seed=7)
  transfer.save_converted(a, str(tmp_path / 'net_a'), {'source': 'test'})
  config = tiny_config(**{'model.depth': depth, 'model.batch_norm': True,
                          'init_from': str(tmp_path / 'net_a')})
  config.dont_load = transfer.net_a_dont_load(config.model)
  model = models.create_model(config.model, 10)
  sharding = jax.sharding.NamedSharding(step_lib.create_mesh(), jax.sharding.PartitionSpec())
  state = step_lib.create_train_state(model, optax.sgd(0.1), config, 3, sharding)
  loaded = transfer.load_init(state, config)

  from_a = {'block1_conv1', 'block1_bn1', 'block2_conv1', 'block2_bn1', 'block3_conv1',
            'block3_bn1', 'block3_conv2', 'block3_bn2', 'fc1', 'fc2', 'predictions'}
  for collection in ('params', 'batch_stats'):
    source = transfer.flatten(a[collection])
    fresh = transfer.flatten(getattr(state, collection))
    for path, value in transfer.flatten(getattr(loaded, collection)).items():
      if path.split('/')[0] in from_a:
        assert not np.array_equal(source[path], fresh[path]), path  # Else the check is void.
        np.testing.assert_array_equal(value, source[path], err_msg=path)
      else:
        np.testing.assert_array_equal(value, fresh[path], err_msg=path)
  layers = {p.split('/')[0] for p in transfer.flatten(loaded.params)}
  assert len(layers - from_a) == 2 * (depth - 3 - 4)  # Conv + BN of each other conv layer.
