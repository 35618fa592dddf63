"""The compiled train step: what XLA is asked to compute for a config."""

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import pytest

from vgg_flax import config as config_lib
from vgg_flax.training import optim
from vgg_flax.training import step as step_lib

from helpers import override


def _compiled_flops(**overrides) -> float:
  config = override(config_lib.get_base_config(), **{
      'model.depth': 11, 'model.width': 16, 'model.fc_dim': 64, 'model.conv_impl': 'xla',
      'image_size': 32, 'input.scale_min': 32, 'input.scale_max': 32,
      'input.eval_resize': 32, 'batch_size': 8, **overrides})
  mesh = step_lib.create_mesh()
  model, tx, lr_fn = step_lib.create_model_and_optimizer(config, 10, steps_per_epoch=10)
  state = step_lib.abstract_train_state(model, tx, config, 3, NamedSharding(mesh, P()))
  data = NamedSharding(mesh, P('data'))
  batch = {'image': jax.ShapeDtypeStruct((8, 32, 32, 3), jnp.float32, sharding=data),
           'label': jax.ShapeDtypeStruct((8,), jnp.int32, sharding=data)}
  compiled = step_lib.make_train_step(config, lr_fn, mesh).lower(state, batch).compile()
  return compiled.cost_analysis()['flops']


def test_frozen_blocks_cost_no_backward_pass():
  # Regression: the gradient norm and finiteness check read every gradient,
  # so XLA kept the frozen blocks' weight gradients (26.97 G vs 26.95 G FLOPs).
  full = _compiled_flops()
  frozen = _compiled_flops(freeze=('block[1-4]_',))
  # Blocks 1-4 hold nearly all the conv FLOPs of a 32 px VGG-11: without their
  # backward, the step is close to a forward pass (1/3 of a training step).
  assert frozen < 0.5 * full, (frozen, full)


def test_a_plateau_drop_is_data_the_step_compiles_once():
  # The host changes the scale in the state between steps; the jitted step must
  # neither recompile nor treat it as a constant (optax alias_test's check).
  config = override(config_lib.get_base_config(), **{
      'model.depth': 11, 'model.width': 4, 'model.fc_dim': 16, 'model.dropout_rate': 0.0,
      'model.conv_impl': 'xla',  # Compiles faster than the CPU's Winograd.
      'image_size': 32, 'batch_size': 4, 'momentum': 0.0, 'schedule.name': 'plateau',
      'learning_rate': 1.0})  # Large steps: the parameter deltas keep their float32 digits.
  mesh = step_lib.create_mesh()
  replicated = NamedSharding(mesh, P())
  model, tx, lr_fn = step_lib.create_model_and_optimizer(config, 10, steps_per_epoch=10)
  state = step_lib.create_train_state(model, tx, config, 3, replicated)
  p_train = step_lib.make_train_step(config, lr_fn, mesh)
  rng = np.random.default_rng(0)
  batch = {'image': jnp.asarray(rng.standard_normal((4, 32, 32, 3)), jnp.float32),
           'label': jnp.asarray([0, 1, 2, 3], jnp.int32)}
  start = jax.device_get(state.params)

  def step_with_scale(scale):
    s = jax.tree.map(jnp.copy, state)  # The step donates its input.
    value = jax.make_array_from_process_local_data(replicated, np.float32(scale))
    s = s.replace(opt_state=optim.set_plateau_scale(s.opt_state, value))
    new, metrics = p_train(s, batch)
    delta = jax.tree.map(lambda a, b: np.asarray(a) - b, jax.device_get(new.params), start)
    return delta, float(metrics['learning_rate'])

  full, lr_full = step_with_scale(1.0)
  dropped, lr_dropped = step_with_scale(0.1)
  assert p_train._cache_size() == 1  # pylint: disable=protected-access
  assert (lr_full, lr_dropped) == pytest.approx((1.0, 0.1), rel=1e-6)
  for a, b in zip(jax.tree.leaves(dropped), jax.tree.leaves(full)):  # SGD: lr x gradient.
    np.testing.assert_allclose(a, 0.1 * b, rtol=1e-4, atol=1e-7)
