"""Schedules and optimisers built from the config."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vgg_flax.config import get_base_config
from vgg_flax.training import optim

from helpers import override

STEPS_PER_EPOCH = 10


def _config(**overrides):
  config = get_base_config()
  config.num_epochs = 10
  config.learning_rate = 0.1
  return override(config, **overrides)


@pytest.mark.parametrize('name, step, expected', [
    ('constant', 0, 0.1), ('constant', 99, 0.1),
    ('step', 29, 0.1), ('step', 30, 0.01), ('step', 60, 0.001),
    ('cosine', 0, 0.1), ('cosine', 50, 0.05), ('cosine', 100, 0.0),
])
def test_schedule_values(name, step, expected):
  config = _config(**{'schedule.name': name, 'schedule.decay_epochs': (3, 6)})
  schedule = optim.learning_rate_schedule(config, STEPS_PER_EPOCH)
  np.testing.assert_allclose(schedule(step), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('name', ['constant', 'step', 'cosine', 'plateau', 'plateau_train_loss'])
def test_warmup_is_linear_from_zero(name):
  config = _config(**{'schedule.name': name, 'schedule.warmup_epochs': 2.0})
  schedule = optim.learning_rate_schedule(config, STEPS_PER_EPOCH)
  np.testing.assert_allclose([schedule(0), schedule(10), schedule(20)], [0.0, 0.05, 0.1],
                             rtol=1e-5)


def test_train_loss_plateau_divides_the_rate_after_patience_epochs():
  config = _config(**{'schedule.name': 'plateau_train_loss', 'schedule.patience_epochs': 2,
                      'schedule.factor': 0.1, 'optimizer': 'sgd', 'weight_decay': 0.0})
  tx, learning_rate = optim.create_optimizer(config, STEPS_PER_EPOCH)
  params = {'w': jnp.ones((2, 2))}
  state = tx.init(params)
  rates = []
  for step in range(5 * STEPS_PER_EPOCH):  # A loss that never improves.
    _, state = tx.update(params, state, params, value=jnp.float32(1.0))
    rates.append(float(learning_rate(jnp.int32(step + 1), state)))
  # Epoch 1 sets the best loss; epochs 2 and 3 do not improve on it -> /10 after epoch 3.
  assert rates[3 * STEPS_PER_EPOCH - 2] == pytest.approx(0.1)
  assert rates[3 * STEPS_PER_EPOCH - 1] == pytest.approx(0.01)


def _two_steps_of_decay(decoupled):
  config = _config(optimizer='sgd', momentum=0.9, weight_decay=0.5,
                   decoupled_weight_decay=decoupled, **{'schedule.name': 'constant'})
  tx, _ = optim.create_optimizer(config, STEPS_PER_EPOCH)
  params = {'kernel': jnp.full((2, 2), 1.0), 'bias': jnp.full((2,), 1.0)}
  state = tx.init(params)
  zeros = {'kernel': jnp.zeros((2, 2)), 'bias': jnp.zeros((2,))}
  for _ in range(2):
    updates, state = tx.update(zeros, state, params, value=jnp.float32(0.0))
    params = optax.apply_updates(params, updates)
  return params


def test_sgd_l2_decay_goes_through_momentum():
  params = _two_steps_of_decay(decoupled=False)
  lr, wd, mu = 0.1, 0.5, 0.9
  w1 = 1 - lr * wd
  w2 = w1 - lr * (mu * wd * 1.0 + wd * w1)
  np.testing.assert_allclose(params['kernel'], w2, rtol=1e-6)
  np.testing.assert_allclose(params['bias'], 1.0)  # Biases are not decayed.


def test_sgd_decoupled_decay_skips_momentum():
  params = _two_steps_of_decay(decoupled=True)
  lr, wd = 0.1, 0.5
  np.testing.assert_allclose(params['kernel'], (1 - lr * wd) ** 2, rtol=1e-6)
  np.testing.assert_allclose(params['bias'], 1.0)


@pytest.mark.parametrize('optimizer', ['sgd', 'adam', 'adamw'])
def test_every_optimizer_descends_a_quadratic(optimizer):
  config = _config(optimizer=optimizer, learning_rate=0.05, weight_decay=0.0,
                   **{'schedule.name': 'constant'})
  tx, _ = optim.create_optimizer(config, STEPS_PER_EPOCH)
  params = {'kernel': jnp.full((3, 3), 2.0)}
  state = tx.init(params)
  for _ in range(50):
    grads = {'kernel': 2 * params['kernel']}
    updates, state = tx.update(grads, state, params, value=jnp.sum(params['kernel'] ** 2))
    params = optax.apply_updates(params, updates)
  assert float(jnp.abs(params['kernel']).max()) < 1.0


@pytest.mark.parametrize('optimizer', ['sgd', 'adam', 'adamw'])
@pytest.mark.parametrize('freeze', [(), ('conv',)])
def test_plateau_rate_with_batchnorm_scales_in_the_params(optimizer, freeze):
  # Regression: the plateau scale was looked up by the key 'scale', which also
  # matches the BatchNorm scales mirrored in the momentum/Adam state (KeyError).
  from vgg_flax.interop import transfer
  config = _config(**{'schedule.name': 'plateau_train_loss', 'optimizer': optimizer,
                      'schedule.patience_epochs': 1, 'freeze': freeze})
  tx, learning_rate = optim.create_optimizer(config, STEPS_PER_EPOCH)
  tx = transfer.freeze(tx, config)
  params = {'conv': {'kernel': jnp.ones((3, 3, 1, 2))},
            'bn': {'scale': jnp.ones((2,)), 'bias': jnp.zeros((2,))}}
  state = tx.init(params)
  grads = jax.tree.map(jnp.zeros_like, params)
  rates = []
  for step in range(3 * STEPS_PER_EPOCH):  # A flat loss: the rate drops after 2 epochs.
    rates.append(float(learning_rate(step, state)))
    _, state = tx.update(grads, state, params, value=jnp.float32(1.0))
  np.testing.assert_allclose(rates[0], 0.1, rtol=1e-6)
  np.testing.assert_allclose(rates[-1], 0.01, rtol=1e-6)


def _plateau_drops(improved, **kwargs):
  """The plateau record after evaluations 1, 2, ... (at steps 1, 2, ...)."""
  record = optim.new_plateau_record()
  for step, better in enumerate(improved, 1):
    record = optim.next_plateau(record, better, step, **kwargs)
  return record


@pytest.mark.parametrize('improved, patience, drops, scale', [
    # The first evaluation always improves (no best yet); then 2 without improvement.
    ([1, 0, 0, 0, 0, 0], 2, [3, 5], 0.01),
    ([1, 0, 1, 0, 1, 0], 2, [], 1.0),  # An improvement resets the count.
    ([1, 0, 0, 1, 0, 0], 2, [3, 6], 0.01),  # After a drop, the count starts again.
    ([1, 0, 0, 0, 0, 0, 0, 0, 0, 0], 1, [2, 3, 4], 1e-3),  # At most 3 drops (min_scale 1e-3).
    ([1, 1, 1], 1, [], 1.0),
])
def test_plateau_drops_after_patience_evaluations_without_improvement(improved, patience, drops,
                                                                      scale):
  record = _plateau_drops([bool(x) for x in improved], patience=patience, factor=0.1,
                          min_scale=1e-3)
  assert record['drops'] == drops
  assert record['scale'] == pytest.approx(scale, rel=1e-9)


def test_plateau_record_is_not_modified():
  record = optim.new_plateau_record()
  optim.next_plateau(record, False, 1, patience=1, factor=0.1, min_scale=1e-3)
  assert record == {'scale': 1.0, 'evals_without_improvement': 0, 'drops': []}


@pytest.mark.parametrize('optimizer', ['sgd', 'adam', 'adamw'])
@pytest.mark.parametrize('freeze', [(), ('conv',)])
def test_plateau_scale_set_by_the_host_scales_the_rate_and_the_updates(optimizer, freeze):
  from vgg_flax.interop import transfer
  config = _config(**{'schedule.name': 'plateau', 'optimizer': optimizer, 'freeze': freeze})
  tx, learning_rate = optim.create_optimizer(config, STEPS_PER_EPOCH)
  tx = transfer.freeze(tx, config)
  params = {'conv': {'kernel': jnp.ones((3, 3, 1, 2))},
            'bn': {'scale': jnp.ones((2,)), 'bias': jnp.zeros((2,))}}
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
  state = tx.init(params)
  full, _ = tx.update(grads, state, params, value=jnp.float32(1.0))
  state = optim.set_plateau_scale(state, jnp.float32(0.1))
  np.testing.assert_allclose(learning_rate(0, state), 0.01, rtol=1e-6)
  scaled, state = tx.update(grads, state, params, value=jnp.float32(1.0))
  for a, b in zip(jax.tree.leaves(scaled), jax.tree.leaves(full)):
    np.testing.assert_allclose(a, 0.1 * b, rtol=1e-6)
  assert float(optim.plateau_state(state, optim.PlateauScaleState).scale) == pytest.approx(0.1)


@pytest.mark.parametrize('name', ['constant', 'step', 'cosine'])
def test_other_schedules_keep_the_optimiser_state_they_had(name):
  # Their checkpoints must resume: only 'plateau' adds a state (one float32 scalar).
  params = {'kernel': jnp.ones((3, 3)), 'bias': jnp.zeros((3,))}
  config = _config(**{'schedule.name': name})
  tx, _ = optim.create_optimizer(config, STEPS_PER_EPOCH)
  before = optax.with_extra_args_support(optax.chain(  # What create_optimizer built for sgd.
      optax.add_decayed_weights(5e-4, optim.decay_mask),
      optax.sgd(optim.learning_rate_schedule(config, STEPS_PER_EPOCH), momentum=0.9)))
  assert (jax.tree.structure(tx.init(params)) == jax.tree.structure(before.init(params)))
  plateau, _ = optim.create_optimizer(_config(**{'schedule.name': 'plateau'}), STEPS_PER_EPOCH)
  leaves = jax.tree.leaves(plateau.init(params))
  assert len(leaves) == len(jax.tree.leaves(before.init(params))) + 1
  with pytest.raises(ValueError, match='expected one PlateauScaleState in the optimiser state, '
                     'found 0'):
    optim.set_plateau_scale(tx.init(params), jnp.float32(0.1))
