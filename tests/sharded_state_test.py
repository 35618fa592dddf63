"""config.state_sharding='fsdp': the train state split over 8 (CPU) devices trains as the
replicated one does, holds an eighth per device, and its checkpoints restore onto
another layout and another device count."""

import subprocess

import jax
import numpy as np

from vgg_flax import config as config_lib
from vgg_flax.training import step as step_lib

from helpers import ROOT, devices_env, python

# Run on 8 (then 1) simulated devices, in a fresh process: the device count is
# fixed when JAX starts. argv: devices, workdir, 'save' or 'restore'.
SCRIPT = r'''
import os, sys
import jax, numpy as np
from vgg_flax import config as config_lib
from vgg_flax.training import checkpoint
from vgg_flax.training import step as step_lib

devices, workdir, mode = int(sys.argv[1]), sys.argv[2], sys.argv[3]
assert jax.device_count() == devices


def build(layout):
  config = config_lib.get_base_config()
  config.image_size, config.batch_size, config.learning_rate = 32, 16, 0.05
  config.model.update(depth=11, width=8, fc_dim=32, batch_norm=True, dropout_rate=0.0,
                      conv_impl='xla')
  config.schedule.name, config.state_sharding = 'constant', layout
  mesh = step_lib.create_mesh()
  model, tx, lr_fn = step_lib.create_model_and_optimizer(config, 10, steps_per_epoch=10)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  state = step_lib.create_train_state(model, tx, config, 3, replicated)
  return config, mesh, lr_fn, state


rng = np.random.RandomState(0)
batches = [{'image': rng.randn(16, 32, 32, 3).astype(np.float32),
            'label': rng.randint(0, 10, 16).astype(np.int32)} for _ in range(3)]
if mode == 'save':
  finals = {}
  for layout in ('replicated', 'fsdp'):
    config, mesh, lr_fn, state = build(layout)
    p_train = step_lib.make_train_step(config, lr_fn, mesh, step_lib.shardings_of(state))
    data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
    losses = []
    for batch in batches:
      state, metrics = p_train(state, jax.device_put(batch, data))
      losses.append(float(metrics['loss']))
    finals[layout] = (state, losses)
    kernel = state.params['block4_conv1']['kernel']  # (3, 3, 32, 64)
    print(layout, 'kernel spec', kernel.sharding.spec, 'shard', kernel.addressable_shards[0].data.shape)
    print(layout, 'losses', ' '.join(f'{l:.7f}' for l in losses))
  np.testing.assert_allclose(finals['fsdp'][1], finals['replicated'][1], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               finals['fsdp'][0].params, finals['replicated'][0].params)
  ckpt = checkpoint.Checkpointer(workdir, keep=1)
  ckpt.save(finals['fsdp'][0], {})
  ckpt.wait()
  np.savez(os.path.join(workdir, 'params.npz'),
           **{jax.tree_util.keystr(k): np.asarray(v) for k, v in
              jax.tree_util.tree_leaves_with_path(finals['fsdp'][0].params)})
  restored, _ = ckpt.restore(build('replicated')[3])  # The other layout, same devices.
  print('restored spec', restored.params['block4_conv1']['kernel'].sharding.spec)
  jax.tree.map(np.testing.assert_array_equal, restored.params, finals['fsdp'][0].params)
else:
  saved = np.load(os.path.join(workdir, 'params.npz'))
  restored, _ = checkpoint.Checkpointer(workdir, keep=1).restore(build('fsdp')[3])
  for k, v in jax.tree_util.tree_leaves_with_path(restored.params):
    np.testing.assert_array_equal(np.asarray(v), saved[jax.tree_util.keystr(k)])
  print('restored on', devices, 'device(s), step', int(restored.step))
'''


def _run(devices, workdir, mode):
  env = devices_env(devices)
  result = subprocess.run([python(), '-c', SCRIPT, str(devices), workdir, mode],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
  assert result.returncode == 0, result.stderr[-4000:]
  return result.stdout


def test_fsdp_trains_as_replicated_holds_an_eighth_and_restores_anywhere(tmp_path):
  out = _run(8, str(tmp_path), 'save')
  # Split along its largest dimension that 8 divides (64 output channels): 8 per device.
  assert "fsdp kernel spec P(None, None, None, 'data') shard (3, 3, 32, 8)" in out, out
  assert 'replicated kernel spec P() shard (3, 3, 32, 64)' in out, out
  assert 'restored spec P()' in out, out
  assert _run(1, str(tmp_path), 'restore').strip().endswith('restored on 1 device(s), step 3')


def test_leaves_no_dimension_divides_stay_replicated():
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1] * 1), ('data',))
  state = step_lib.TrainState(step=0, apply_fn=None, params={'w': np.zeros((3, 5))}, tx=None,
                              opt_state=(), batch_stats={}, rng=np.zeros(2, np.uint32))
  layout = step_lib.state_shardings(state, mesh, 'fsdp')
  assert layout.params['w'].spec == jax.sharding.PartitionSpec()  # One device: nothing to split.
  assert config_lib.STATE_SHARDINGS == ('replicated', 'fsdp')
