"""Optimisers and learning-rate schedules from the config, all built from optax.

`create_optimizer` returns the optax transformation and `learning_rate(step,
opt_state)`, the rate actually applied at a step (schedule times the
reduce-on-plateau scale), which the train step reports.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

LearningRateFn = Callable[[jax.Array, Any], jax.Array]
PlateauState = optax.contrib.ReduceLROnPlateauState


def learning_rate_schedule(config: ml_collections.ConfigDict,
                           steps_per_epoch: int) -> optax.Schedule:
  """The schedule named by `config.schedule.name`, with linear warm-up.

  'plateau' is a constant here: `optax.contrib.reduce_on_plateau`, chained
  after the optimiser, scales the updates when the training loss stalls.
  """
  s = config.schedule
  base = config.learning_rate
  warmup = int(s.warmup_epochs * steps_per_epoch)
  total = max(config.num_epochs * steps_per_epoch, warmup + 1)
  if s.name == 'cosine':
    return optax.warmup_cosine_decay_schedule(0.0, base, warmup, total)
  if s.name == 'step':
    boundaries = {int(e * steps_per_epoch) - warmup: s.factor for e in s.decay_epochs}
    main = optax.piecewise_constant_schedule(base, boundaries)
  else:  # 'constant' and 'plateau'
    main = optax.constant_schedule(base)
  if not warmup:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, base, warmup), main], [warmup])


def decay_mask(params: Any) -> Any:
  """True for kernels (ndim > 1); biases and norm scales are not decayed."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def _base_optimizer(config: ml_collections.ConfigDict,
                    schedule: optax.Schedule) -> optax.GradientTransformation:
  wd = config.weight_decay
  if config.optimizer == 'adamw':
    return optax.adamw(schedule, weight_decay=wd, mask=decay_mask)
  if config.optimizer == 'adam':
    if config.decoupled_weight_decay:
      return optax.adamw(schedule, weight_decay=wd, mask=decay_mask)
    return optax.chain(optax.add_decayed_weights(wd, decay_mask), optax.adam(schedule))
  # SGD with momentum. The paper's L2 penalty adds wd * w to the gradient before
  # the momentum; decoupled (SGDW) decays the weights after it, scaled by the lr.
  if config.decoupled_weight_decay:
    return optax.chain(
        optax.trace(decay=config.momentum, nesterov=config.nesterov),
        optax.add_decayed_weights(wd, decay_mask),
        optax.scale_by_learning_rate(schedule))
  return optax.chain(
      optax.add_decayed_weights(wd, decay_mask),
      optax.sgd(schedule, momentum=config.momentum or None, nesterov=config.nesterov))


def plateau_state(opt_state: Any) -> PlateauState:
  """The reduce-on-plateau transform's own state inside `opt_state`.

  Found by type, not by key: a key lookup of 'scale' would also match the
  BatchNorm `scale` parameters that the momentum and Adam states mirror.

  Raises:
    ValueError: when `opt_state` holds no plateau state, or several.
  """
  found = [x for x in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, PlateauState))
           if isinstance(x, PlateauState)]
  if len(found) != 1:
    raise ValueError(f'expected one reduce-on-plateau state in the optimiser state, found '
                     f'{len(found)}')
  return found[0]


def create_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int,
                     ) -> tuple[optax.GradientTransformationExtraArgs, LearningRateFn]:
  """Builds the optimiser of `config` and the function giving its current lr.

  The returned transformation accepts `value=loss` in `update`, which only
  reduce-on-plateau reads (it averages the loss over an epoch, then divides
  the rate by 1/factor after `patience_epochs` epochs without improvement).
  """
  schedule = learning_rate_schedule(config, steps_per_epoch)
  tx = _base_optimizer(config, schedule)
  s = config.schedule
  if s.name == 'plateau':
    tx = optax.chain(tx, optax.contrib.reduce_on_plateau(
        factor=s.factor, patience=s.patience_epochs,
        accumulation_size=steps_per_epoch, min_scale=s.min_scale))
  else:
    tx = optax.with_extra_args_support(tx)

  def learning_rate(step: jax.Array, opt_state: Any) -> jax.Array:
    lr = jnp.asarray(schedule(step), jnp.float32)
    if s.name == 'plateau':
      lr = lr * plateau_state(opt_state).scale
    return lr

  return tx, learning_rate
