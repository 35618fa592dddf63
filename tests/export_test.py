"""conv_impl='auto' follows the platform a step is exported for, not this CPU host's.

`jax.export` lowers the tiny VGG-11's forward pass and the trainer's own train
step for TPU, CUDA and the CPU from here; the StableHLO's convolutions and
matmuls say which lowering each conv layer got.
"""

import functools
import re

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import pytest

from vgg_flax import config as config_lib
from vgg_flax import models
from vgg_flax.training import step as step_lib

from helpers import override

CONVS, DENSES = 8, 3  # VGG-11.
# Batch 64 at 32 px: on the CPU, blocks 3 and 4 take Winograd (F(4x4) on the
# 8 px maps, F(2x2) on the 4 px ones), the others patches (3 or 8 input
# channels in blocks 1 and 2, too few tiles in block 5).
BATCH, SIZE = 64, 32
WINOGRAD, PATCHES = 4, 4
# Matmuls of one Winograd layer: 2 for the input transform, 2 for the kernel's,
# 1 product, 2 for the output transform; the gradient of each transform with
# respect to its data (not to the constant matrix) and 2 for the product.
WINOGRAD_DOTS = 7
WINOGRAD_GRAD_DOTS = 8


def _op_counts(exported) -> dict[str, int]:
  text = exported.mlir_module()
  return {op: len(re.findall(rf'\bstablehlo\.{op}\b', text))
          for op in ('convolution', 'dot_general')}


def _forward():
  model = models.VGG(depth=11, width=8, fc_dim=32, num_classes=10, conv_impl='auto')
  images = jax.ShapeDtypeStruct((BATCH, SIZE, SIZE, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), images)
  return jax.jit(functools.partial(model.apply, train=False)), (variables, images)


def _train_step():
  config = override(config_lib.get_base_config(), **{
      'model.depth': 11, 'model.width': 8, 'model.fc_dim': 32, 'model.conv_impl': 'auto',
      'image_size': SIZE, 'batch_size': BATCH})
  mesh = step_lib.create_mesh()
  model, tx, lr_fn = step_lib.create_model_and_optimizer(config, 10, steps_per_epoch=10)
  state = step_lib.abstract_train_state(model, tx, config, 3, NamedSharding(mesh, P()))
  data = NamedSharding(mesh, P('data'))
  batch = {'image': jax.ShapeDtypeStruct((BATCH, SIZE, SIZE, 3), jnp.float32, sharding=data),
           'label': jax.ShapeDtypeStruct((BATCH,), jnp.int32, sharding=data)}
  return step_lib.make_train_step(config, lr_fn, mesh), (state, batch)


def _counts(program: str, platform: str) -> dict[str, int]:
  fn, args = {'forward': _forward, 'train_step': _train_step}[program]()
  return _op_counts(jax.export.export(fn, platforms=(platform,))(*args))


# In the train step each conv (and each dense layer) is differentiated for its
# kernel and, except the first conv, whose input is the image, for its input.
@pytest.mark.parametrize('program,convs,dots', [
    ('forward', CONVS, DENSES),
    ('train_step', 3 * CONVS - 1, 3 * DENSES),
])
@pytest.mark.parametrize('platform', ['tpu', 'cuda'])
def test_auto_exports_native_convolutions_for_accelerators(program, convs, dots, platform):
  # Every conv a native convolution, and the only matmuls the dense layers':
  # no Winograd transform or patches matmul.
  assert _counts(program, platform) == {'convolution': convs, 'dot_general': dots}


@pytest.mark.parametrize('program,dots', [
    ('forward', PATCHES + WINOGRAD * WINOGRAD_DOTS + DENSES),
    ('train_step', 3 * PATCHES - 1 + WINOGRAD * (WINOGRAD_DOTS + WINOGRAD_GRAD_DOTS)
     + 3 * DENSES),
])
def test_auto_exports_the_matmul_lowerings_for_the_cpu(program, dots):
  assert _counts(program, 'cpu') == {'convolution': 0, 'dot_general': dots}
