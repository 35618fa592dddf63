"""Orbax checkpoints: round trip, latest-N, best-1."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vgg_flax.training import checkpoint
from vgg_flax.training.step import TrainState


class _Tiny(nn.Module):

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Dense(4)(x)
    return nn.BatchNorm(use_running_average=not train)(x)


def _state(seed=0):
  model = _Tiny()
  variables = model.init(jax.random.PRNGKey(seed), jnp.ones((2, 3)))
  return TrainState.create(apply_fn=model.apply, params=variables['params'],
                           tx=optax.sgd(0.1, momentum=0.9),
                           batch_stats=variables['batch_stats'], rng=jax.random.PRNGKey(7))


def _advance(state, steps):
  for _ in range(steps):
    grads = jax.tree.map(jnp.ones_like, state.params)
    state = state.apply_gradients(grads=grads)
  return state


def _assert_trees_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


def _randomised(tree, seed):
  """`tree` with every leaf replaced by random values (positive, for variances)."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree.unflatten(treedef, [
      jnp.abs(jax.random.normal(k, x.shape, x.dtype)) + 0.5 for k, x in zip(keys, leaves)])


def test_round_trip_restores_every_field(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=2)
  # Every field away from what a fresh state holds: the step, the params and
  # momentum (3 updates), batch statistics a training step would have changed,
  # another rng. A restore that kept any field of the template fails below.
  state = _advance(_state(), 3)
  state = state.replace(batch_stats=_randomised(state.batch_stats, 1),
                        rng=jax.random.PRNGKey(1234))
  ckpt.save(state, {'best': 0.5, 'done': False})
  ckpt.wait()
  template = _state(seed=1)
  restored, meta = ckpt.restore(template)
  assert int(restored.step) == 3
  assert meta == {'best': 0.5, 'done': False}
  for field in checkpoint.STATE_FIELDS:
    saved, fresh = jax.tree.leaves(getattr(state, field)), jax.tree.leaves(getattr(template, field))
    assert not any(np.array_equal(a, b) for a, b in zip(saved, fresh)), field
    _assert_trees_equal(getattr(restored, field), getattr(state, field))
  ckpt.close()


def test_keeps_latest_n_and_the_best_apart(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=2)
  state = _state()
  for step in range(1, 5):
    state = _advance(state, 1)
    ckpt.save(state, {'step': step}, best=(step == 2))
  ckpt.wait()
  latest = sorted(os.listdir(tmp_path / 'checkpoints' / 'latest'))
  assert [d for d in latest if d.isdigit()] == ['3', '4']
  restored, meta = ckpt.restore(_state(), best=True)
  assert int(restored.step) == 2 and meta == {'step': 2}
  ckpt.close()


def test_empty_workdir_restores_nothing(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=1)
  assert ckpt.restore(_state()) is None
  assert ckpt.latest_step() is None
  ckpt.close()
