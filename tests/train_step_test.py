"""The compiled train step: what XLA is asked to compute for a config."""

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from vgg_flax import config as config_lib
from vgg_flax import step as step_lib

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
