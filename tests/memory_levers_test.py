"""The levers that fit a batch in less memory: gradient accumulation and remat,
each equal to the plain step and lower in compiled memory; and a profile on demand."""

import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vgg_flax import config as config_lib
from vgg_flax import train
from vgg_flax.runtime import errors
from vgg_flax.training import preflight
from vgg_flax.training import step as step_lib

from helpers import tiny_config


def _setup(**overrides):
  """A VGG-11 of width 8 without BatchNorm or dropout, SGD momentum, its state and batches."""
  config = config_lib.get_base_config()
  config.image_size, config.batch_size, config.learning_rate = 32, 16, 0.05
  config.model.update(depth=11, width=8, fc_dim=32, batch_norm=False, dropout_rate=0.0,
                      conv_impl='xla')
  config.schedule.name = 'constant'
  for key, value in overrides.items():
    target, *_ = key.split('.')
    if '.' in key:
      config[target][key.split('.')[1]] = value
    else:
      config[key] = value
  mesh = step_lib.create_mesh()
  model, tx, lr_fn = step_lib.create_model_and_optimizer(config, 10, steps_per_epoch=10)
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  state = step_lib.create_train_state(model, tx, config, 3, sharding)
  rng = np.random.RandomState(0)
  batches = [{'image': rng.randn(16, 32, 32, 3).astype(np.float32),
              'label': rng.randint(0, 10, 16).astype(np.int32)} for _ in range(3)]
  return config, mesh, lr_fn, state, batches


def _train(config, mesh, lr_fn, state, batches):
  p_train = step_lib.make_train_step(config, lr_fn, mesh)
  losses = []
  for batch in batches:
    state, metrics = p_train(state, batch)
    losses.append(float(metrics['loss']))
  return state, losses


def test_micro_batches_keep_each_devices_rows():
  rows = jnp.arange(16)  # 4 devices of 4 rows: micro-batch i of k=2 takes rows i, i+2, ...
  np.testing.assert_array_equal(step_lib.micro_batches(rows, 2),
                                [[0, 2, 4, 6, 8, 10, 12, 14], [1, 3, 5, 7, 9, 11, 13, 15]])


@pytest.mark.parametrize('k', [2, 4])
def test_accumulated_micro_batches_equal_one_step_on_the_batch(k):
  plain = _train(*_setup())
  accumulated = _train(*_setup(grad_accum_steps=k))
  np.testing.assert_allclose(accumulated[1], plain[1], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               accumulated[0].params, plain[0].params)
  assert int(accumulated[0].step) == 3  # Optimiser steps, not micro-batches.


@pytest.mark.parametrize('remat', ['block', 'layer'])
def test_remat_gives_the_plain_steps_results(remat):
  plain = _train(*_setup())
  rematerialised = _train(*_setup(**{'model.remat': remat}))
  np.testing.assert_allclose(rematerialised[1], plain[1], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               rematerialised[0].params, plain[0].params)


def _temp_bytes(**overrides):
  config, mesh, lr_fn, state, batches = _setup(**overrides)
  compiled = step_lib.make_train_step(config, lr_fn, mesh).lower(state, batches[0]).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_accumulation_lowers_the_compiled_memory():
  # Remat's effect shows only at real sizes (benchmarks/README.md, compiled for a TPU):
  # at this size the recomputation's own buffers outweigh what it saves.
  plain, accumulated = _temp_bytes(), _temp_bytes(grad_accum_steps=4)
  assert accumulated < 0.6 * plain, (plain, accumulated)


def test_a_k_that_does_not_divide_the_device_batch_is_refused():
  config = config_lib.get_base_config()
  config.batch_size, config.grad_accum_steps = 16, 3
  with pytest.raises(errors.UsageError) as e:
    preflight.check_training_config(config)
  assert str(e.value) == ('config.grad_accum_steps=3 does not divide the batch of each device '
                          '(16 over 1 devices: 16); use a divisor of 16.')


@pytest.mark.parametrize('field,value,message', [
    ('model.remat', 'all',
     "config.model.remat='all' is not allowed: expected one of 'none', 'block', 'layer'."),
    ('grad_accum_steps', 0, 'config.grad_accum_steps=0 is not allowed: must be >= 1.'),
    ('profile_steps', (5, 2), 'config.profile_steps=(5, 2) is not allowed: must be () or '
     '(first, last) steps with 1 <= first <= last.')])
def test_bad_lever_values_name_the_field(field, value, message):
  config = config_lib.get_base_config()
  config.dataset = 'digits'
  section, _, leaf = field.rpartition('.')
  (config[section] if section else config)[leaf] = value
  with pytest.raises(ValueError) as e:
    config_lib.validate(config)
  assert str(e.value) == message


def test_profile_steps_write_a_trace_that_names_the_train_step(tmp_path):
  config = tiny_config(tmp_path / 'tfds', num_epochs=1)
  config.train_split, config.profile_steps = 'train[:128]', (2, 3)
  train.train_and_evaluate(config, str(tmp_path / 'run'))
  traces = glob.glob(str(tmp_path / 'run' / 'plugins' / 'profile' / '*' / '*.xplane.pb'))
  assert len(traces) == 1, os.listdir(tmp_path / 'run')
  assert b'train_step' in open(traces[0], 'rb').read()
