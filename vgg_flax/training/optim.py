"""Optimisers and learning-rate schedules from the config, all built from optax.

`create_optimizer` returns the optax transformation and `learning_rate(step,
opt_state)`, the rate actually applied at a step (schedule times the plateau
scale), which the train step reports.

Two schedules divide the rate by 1/factor when a metric stops improving:

- 'plateau', the paper's: the metric is `checkpoint.monitor` (validation
  accuracy by default). The host decides at each evaluation (`next_plateau`)
  and writes the scale into the optimiser state (`set_plateau_scale`; both
  done by `apply_plateau`), where `scale_by_plateau` multiplies the updates by
  it. The scale is an array in the state, not a constant of the step: the
  step stays pure and compiles once, and the scale is checkpointed with the
  state, so a resumed run goes on with the same rate.
- 'plateau_train_loss': `optax.contrib.reduce_on_plateau` inside the step,
  fed the epoch-averaged training loss (what 'plateau' was before). Kept so
  that runs started with it resume exactly; a training loss that creeps down
  by a fraction of a percent per epoch never triggers it.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

LearningRateFn = Callable[[jax.Array, Any], jax.Array]
PlateauState = optax.contrib.ReduceLROnPlateauState
PLATEAU_SCHEDULES = ('plateau', 'plateau_train_loss')


class PlateauScaleState(NamedTuple):
  """The factor on the learning rate that the host sets at evaluations (float32 scalar)."""
  scale: jax.Array


def scale_by_plateau() -> optax.GradientTransformation:
  """Multiplies the updates by the state's scale, which only the host changes."""

  def init_fn(params):
    del params
    return PlateauScaleState(scale=jnp.ones([], jnp.float32))

  def update_fn(updates, state, params=None):
    del params
    return jax.tree.map(lambda u: u * state.scale.astype(u.dtype), updates), state

  return optax.GradientTransformation(init_fn, update_fn)


def _is_plateau_scale(x: Any) -> bool:
  return isinstance(x, PlateauScaleState)


def set_plateau_scale(opt_state: Any, scale: jax.Array) -> Any:
  """`opt_state` with the plateau scale replaced by `scale` (a float32 scalar array).

  Give `scale` the sharding of the state (replicated): the jitted step then
  sees arrays of the same shapes and shardings and does not recompile.
  """
  plateau_state(opt_state, PlateauScaleState)  # Exactly one, or a clear error.
  return jax.tree.map(lambda x: x._replace(scale=scale) if _is_plateau_scale(x) else x,
                      opt_state, is_leaf=_is_plateau_scale)


def new_plateau_record() -> dict[str, Any]:
  """The host's plateau bookkeeping at the start of a run (kept in the checkpoint's meta)."""
  return {'scale': 1.0, 'evals_without_improvement': 0, 'drops': []}


def next_plateau(record: dict[str, Any], improved: bool, step: int, *, patience: int,
                 factor: float, min_scale: float) -> dict[str, Any]:
  """The plateau record after an evaluation at `step`: the paper's decision.

  The rate is multiplied by `factor` once the monitored metric has not improved
  for `patience` evaluations in a row; the count then starts again (the best
  value is kept). It never goes below `min_scale` times the base rate: with
  factor 0.1 and min_scale 1e-3, the paper's three drops.

  Args:
    record: `new_plateau_record()` or the previous result; not modified.
    improved: whether this evaluation beat the best one so far.
    step: the step of the evaluation; a drop applies from the next step on.
    patience, factor, min_scale: `config.schedule`'s.

  Returns:
    {'scale', 'evals_without_improvement', 'drops': steps of the drops so far}.
  """
  waited = 0 if improved else record['evals_without_improvement'] + 1
  scale, drops = record['scale'], list(record['drops'])
  # A relative tolerance: 0.1 ** 3 is 1.0000000000000002e-3 in floating point.
  if waited >= patience and scale * factor >= min_scale * (1 - 1e-6):
    scale, waited = scale * factor, 0
    drops.append(int(step))
  return {'scale': scale, 'evals_without_improvement': waited, 'drops': drops}


def apply_plateau(state: Any, record: dict[str, Any], step: int, improved: bool, *,
                  config: ml_collections.ConfigDict, sharding: jax.sharding.Sharding,
                  learning_rate_fn: LearningRateFn) -> tuple[Any, dict[str, Any]]:
  """The paper's plateau rule at the evaluation at `step`: `(state, record)` after it.

  `next_plateau` decides; if the rate drops, the train state's optimiser gets
  the new scale and the new rate is logged.

  Args:
    state: the train state.
    record: the plateau record so far; not modified.
    step: the step of the evaluation.
    improved: whether this evaluation beat the best one so far.
    config: the run's config (`schedule`, `checkpoint.monitor`).
    sharding: the state's (replicated).
    learning_rate_fn: `create_optimizer`'s, for the log line.
  """
  s = config.schedule
  new = next_plateau(record, improved, step, patience=s.patience, factor=s.factor,
                     min_scale=s.min_scale)
  if new['scale'] == record['scale']:
    return state, new
  # A replicated float32 scalar, like the leaf it replaces: the step does not recompile.
  value = jax.make_array_from_process_local_data(sharding, np.float32(new['scale']))
  state = state.replace(opt_state=set_plateau_scale(state.opt_state, value))
  lr = float(jax.device_get(learning_rate_fn(step, state.opt_state)))
  logging.info('%s has not improved for %d evaluations: learning rate x%g from step %d, now '
               '%.3g (drop %d; scale %g).', config.checkpoint.monitor, s.patience, s.factor,
               step + 1, lr, len(new['drops']), new['scale'])
  return state, new


def learning_rate_schedule(config: ml_collections.ConfigDict,
                           steps_per_epoch: int) -> optax.Schedule:
  """The schedule named by `config.schedule.name`, with linear warm-up.

  The plateaus are a constant here: their scale multiplies the updates (see
  the module docstring).
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
  else:  # 'constant' and the plateaus.
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


def plateau_state(opt_state: Any, kind: type = PlateauState) -> Any:
  """The plateau transform's own state inside `opt_state`: `kind` is `PlateauState`
  ('plateau_train_loss') or `PlateauScaleState` ('plateau').

  Found by type, not by key: a key lookup of 'scale' would also match the
  BatchNorm `scale` parameters that the momentum and Adam states mirror.

  Raises:
    ValueError: when `opt_state` holds no such state, or several.
  """
  found = [x for x in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, kind))
           if isinstance(x, kind)]
  if len(found) != 1:
    raise ValueError(f'expected one {kind.__name__} in the optimiser state, found {len(found)}')
  return found[0]


def create_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int,
                     ) -> tuple[optax.GradientTransformationExtraArgs, LearningRateFn]:
  """Builds the optimiser of `config` and the function giving its current lr.

  The returned transformation accepts `value=loss` in `update`, which only
  'plateau_train_loss' reads (it averages the loss over an epoch, then divides
  the rate by 1/factor after `patience_epochs` epochs without improvement).
  'plateau' adds `scale_by_plateau` (one float32 scalar in the state); the
  other schedules keep the optimiser state they always had, so their
  checkpoints resume.
  """
  schedule = learning_rate_schedule(config, steps_per_epoch)
  tx = _base_optimizer(config, schedule)
  s = config.schedule
  if s.name == 'plateau_train_loss':
    tx = optax.chain(tx, optax.contrib.reduce_on_plateau(
        factor=s.factor, patience=s.patience_epochs,
        accumulation_size=steps_per_epoch, min_scale=s.min_scale))
  elif s.name == 'plateau':
    tx = optax.with_extra_args_support(optax.chain(tx, scale_by_plateau()))
  else:
    tx = optax.with_extra_args_support(tx)
  kind = {'plateau': PlateauScaleState, 'plateau_train_loss': PlateauState}.get(s.name)

  def learning_rate(step: jax.Array, opt_state: Any) -> jax.Array:
    lr = jnp.asarray(schedule(step), jnp.float32)
    if kind is not None:
      lr = lr * plateau_state(opt_state, kind).scale
    return lr

  return tx, learning_rate
