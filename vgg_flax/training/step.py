"""The train state, the pure train and eval steps, and their compilation over a mesh.

`train_step(state, batch) -> (state, metrics)` is a pure function of its
inputs: dropout keys fold the step number into the state's key, and nothing
reaches the host. `make_train_step` jits it over a 1-D `data` mesh (batch
sharded, state replicated and donated); the training loop (`vgg_flax.train`),
the benchmark and the TPU compile check (`vgg_flax.aot`) all run that same
function.
"""

from __future__ import annotations

import collections
import functools
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
import optax
from flax.training import train_state

from vgg_flax.data import normalization
from vgg_flax.interop import transfer
from vgg_flax import models
from vgg_flax.runtime import cpu
from vgg_flax.training import optim


class TrainState(train_state.TrainState):
  batch_stats: Any
  rng: jax.Array  # Base key; each step folds in its step number.


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float) -> jax.Array:
  targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
  return optax.softmax_cross_entropy(logits, targets)


def _variables(params, batch_stats) -> dict[str, Any]:
  return {'params': params, 'batch_stats': batch_stats} if batch_stats else {'params': params}


def trained_leaves(tree: Any, freeze: tuple[str, ...]) -> list[jax.Array]:
  """The leaves of a params-shaped `tree` that `freeze` does not hold fixed."""
  if not freeze:
    return jax.tree.leaves(tree)
  labels = transfer.freeze_labels(tree, freeze)
  return [leaf for leaf, label in zip(jax.tree.leaves(tree), jax.tree.leaves(labels))
          if label == transfer.TRAINABLE]


Normalize = Callable[[jax.Array], jax.Array]


def _images(batch: dict[str, jax.Array], normalize: Normalize | None) -> jax.Array:
  # uint8 batches (a quarter of float32's bytes from host to device) are
  # normalised here, where XLA fuses it into the first layer.
  image = batch['image']
  return normalize(image) if normalize is not None and image.dtype == jnp.uint8 else image


# config.model.remat: the activations the backward pass keeps; the rest is
# computed again from them (jax.checkpoint), for memory.
REMAT_POLICIES = {
    'none': None,
    'block': jax.checkpoint_policies.save_only_these_names(models.BLOCK_OUTPUT),
    'layer': jax.checkpoint_policies.save_only_these_names(models.BLOCK_OUTPUT,
                                                           models.LAYER_OUTPUT),
}


def micro_batches(x: jax.Array, k: int) -> jax.Array:
  """(B, ...) -> (k, B/k, ...): micro-batch i holds rows i, i+k, ..., so each
  device's rows of a batch split over 'data' stay on it (k divides them)."""
  return x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)


def train_step(state: TrainState, batch: dict[str, jax.Array], *,
               learning_rate_fn: optim.LearningRateFn, label_smoothing: float,
               skip_nonfinite: bool = False, freeze: tuple[str, ...] = (),
               normalize: Normalize | None = None, accum_steps: int = 1,
               remat: str = 'none') -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimisation step on a global batch; returns the new state and metrics.

  `batch['image']` is float32, or uint8 that `normalize` turns into float32.
  The 'plateau' schedule's scale is a leaf of `state.opt_state` that the host
  sets at evaluations (`optim.set_plateau_scale`): data, so a drop does not
  recompile the step.

  With `accum_steps` k > 1 (config.grad_accum_steps) the batch is taken as k
  micro-batches in a `lax.scan`, their gradients averaged: one optimiser
  update, the activations of one micro-batch alive at a time. BatchNorm
  statistics are then those of each micro-batch, and its running averages
  move k times. `remat` (config.model.remat) keeps only the activations of
  REMAT_POLICIES[remat] for the backward pass.

  With `skip_nonfinite`, a step whose loss or gradient is not finite leaves
  params, batch_stats and opt_state unchanged (the step count still advances,
  so the data moves on); the `nonfinite` metric flags such steps either way.
  The gradient norm and the finiteness check cover only the parameters that
  `freeze` (config.freeze) leaves trainable: frozen gradients are then unused,
  and XLA drops their part of the backward pass.
  """
  dropout_rng = jax.random.fold_in(state.rng, state.step)
  images, labels = _images(batch, normalize), batch['label']

  def loss_fn(params, batch_stats, images, labels, rng):
    logits, updates = state.apply_fn(
        _variables(params, batch_stats), images, train=True,
        rngs={'dropout': rng}, mutable=['batch_stats'])
    loss = cross_entropy(logits, labels, label_smoothing).mean()
    hits = jnp.sum(jnp.argmax(logits, -1) == labels)
    return loss, (hits, updates.get('batch_stats', batch_stats))

  if REMAT_POLICIES[remat] is not None:
    loss_fn = jax.checkpoint(loss_fn, policy=REMAT_POLICIES[remat])
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if accum_steps == 1:
    (loss, (hits, batch_stats)), grads = grad_fn(state.params, state.batch_stats, images,
                                                 labels, dropout_rng)
  else:
    def micro_step(carry, xs):
      grads, batch_stats, loss, hits = carry
      i, images, labels = xs
      (l, (h, batch_stats)), g = grad_fn(state.params, batch_stats, images, labels,
                                         jax.random.fold_in(dropout_rng, i))
      return (jax.tree.map(jnp.add, grads, g), batch_stats, loss + l, hits + h), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    xs = (jnp.arange(accum_steps), micro_batches(images, accum_steps),
          micro_batches(labels, accum_steps))
    (grads, batch_stats, loss, hits), _ = jax.lax.scan(
        micro_step, (zeros, state.batch_stats, jnp.zeros(()), jnp.zeros((), jnp.int32)), xs)
    grads = jax.tree.map(lambda g: g / accum_steps, grads)
    loss = loss / accum_steps
  grad_norm = optax.global_norm(trained_leaves(grads, freeze))
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params, value=loss)
  new = (optax.apply_updates(state.params, updates), opt_state, batch_stats)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  if skip_nonfinite:
    old = (state.params, state.opt_state, state.batch_stats)
    new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  params, opt_state, batch_stats = new
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            batch_stats=batch_stats)
  metrics = {
      'loss': loss,
      'accuracy': hits / labels.shape[0],
      'learning_rate': learning_rate_fn(state.step, state.opt_state),
      'grad_norm': grad_norm,
      'nonfinite': ~finite,
  }
  return new_state, metrics


def eval_step(state: TrainState, batch: dict[str, jax.Array], *,
              normalize: Normalize | None = None) -> dict[str, jax.Array]:
  """Sums of loss and top-1/top-5 hits over the real (mask = 1) examples."""
  logits = state.apply_fn(_variables(state.params, state.batch_stats), _images(batch, normalize),
                          train=False)
  mask = batch['mask']
  k = min(5, logits.shape[-1])
  top_k = jax.lax.top_k(logits, k)[1]
  hits = top_k == batch['label'][:, None]
  return {
      'loss': jnp.sum(cross_entropy(logits, batch['label'], 0.0) * mask),
      'accuracy': jnp.sum(hits[:, 0] * mask),
      'top5_accuracy': jnp.sum(jnp.any(hits, axis=-1) * mask),
      'count': jnp.sum(mask),
  }


@jax.jit
def all_finite(tree: Any) -> jax.Array:
  """Whether every floating-point leaf of `tree` is finite: one boolean, on the device."""
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def create_mesh() -> jax.sharding.Mesh:
  """A 1-D `data` mesh over every device of every process."""
  return jax.make_mesh((jax.device_count(),), ('data',),
                       axis_types=(jax.sharding.AxisType.Auto,))


def create_model_and_optimizer(config: ml_collections.ConfigDict, num_classes: int,
                               steps_per_epoch: int):
  """The model, the optax transformation (with config.freeze applied) and the lr function."""
  model = models.create_model(config.model, num_classes)
  tx, learning_rate_fn = optim.create_optimizer(config, steps_per_epoch)
  tx = transfer.freeze(tx, config)  # config.freeze: no update, no optimiser state.
  return model, tx, learning_rate_fn


def state_shardings(state: Any, mesh: jax.sharding.Mesh, layout: str = 'replicated') -> Any:
  """The sharding of each leaf of a train state (or of its shapes) for `layout`.

  'replicated': every device holds all of it. 'fsdp' (config.state_sharding):
  each array of the parameters, optimiser state and BatchNorm statistics is
  split over the 'data' axis along its largest dimension that the axis
  divides (ZeRO-3 / FSDP: XLA gathers a layer's weights where the step needs
  them); arrays with no such dimension, the step and the rng stay replicated.
  """
  replicated = NamedSharding(mesh, P())
  if layout == 'replicated':
    return jax.tree.map(lambda _: replicated, state)
  n = mesh.shape['data']

  def split(x):
    dims = [d for d in range(len(x.shape)) if x.shape[d] % n == 0]
    if n == 1 or not dims:
      return replicated
    d = max(dims, key=lambda d: x.shape[d])
    return NamedSharding(mesh, P(*(('data' if i == d else None) for i in range(len(x.shape)))))

  return state.replace(
      step=replicated, rng=replicated, params=jax.tree.map(split, state.params),
      opt_state=jax.tree.map(split, state.opt_state),
      batch_stats=jax.tree.map(split, state.batch_stats))


def shardings_of(state: Any) -> Any:
  """The shardings a (possibly abstract) train state is laid out with."""
  return jax.tree.map(lambda x: x.sharding, state)


def _init_fn(model, tx, config: ml_collections.ConfigDict, num_channels: int):
  def init(rng):
    params_rng, dropout_rng, step_rng = jax.random.split(rng, 3)
    shape = (1, config.image_size, config.image_size, num_channels)
    variables = model.init({'params': params_rng, 'dropout': dropout_rng},
                           jnp.zeros(shape, jnp.float32), train=False)
    return TrainState.create(apply_fn=model.apply, params=variables['params'], tx=tx,
                             batch_stats=variables.get('batch_stats', {}), rng=step_rng)
  return init


def create_train_state(model, tx, config: ml_collections.ConfigDict, num_channels: int,
                       sharding: NamedSharding) -> TrainState:
  """Initialises parameters from `config.seed` on the mesh of `sharding`, laid out
  as config.state_sharding says (`state_shardings`)."""
  init = _init_fn(model, tx, config, num_channels)
  key = jax.random.PRNGKey(config.seed)
  layout = state_shardings(jax.eval_shape(init, key), sharding.mesh, config.state_sharding)
  return cpu.run_once(jax.jit(init, out_shardings=layout), key)


def abstract_train_state(model, tx, config: ml_collections.ConfigDict, num_channels: int,
                         sharding: NamedSharding) -> TrainState:
  """The train state's shapes, dtypes and shardings, without allocating it (for AOT)."""
  init = _init_fn(model, tx, config, num_channels)
  shapes = jax.eval_shape(init, jax.random.PRNGKey(config.seed))
  layout = state_shardings(shapes, sharding.mesh, config.state_sharding)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      shapes, layout)


def normalizer(config: ml_collections.ConfigDict) -> Normalize:
  """The config's input normalisation, for uint8 batches on the device."""
  return functools.partial(normalization.normalize_on_device, config=config)


def make_train_step(config: ml_collections.ConfigDict, learning_rate_fn: optim.LearningRateFn,
                    mesh: jax.sharding.Mesh, state_sharding: Any = None):
  """`train_step` of `config`, jitted over `mesh`: batch split on 'data', state
  laid out as `state_sharding` (`shardings_of(state)`; default replicated) and
  donated, uint8 images normalised on the device.
  `train_and_evaluate` runs it; `vgg_flax.aot` compiles it."""
  replicated, data_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))
  state_sharding = replicated if state_sharding is None else state_sharding
  return jax.jit(
      functools.partial(train_step, learning_rate_fn=learning_rate_fn,
                        label_smoothing=config.label_smoothing,
                        skip_nonfinite=config.on_nonfinite == 'skip',
                        freeze=tuple(config.freeze), normalize=normalizer(config),
                        accum_steps=config.grad_accum_steps, remat=config.model.remat),
      in_shardings=(state_sharding, data_sharding), out_shardings=(state_sharding, replicated),
      donate_argnums=0)


def make_eval_step(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                   state_sharding: Any = None):
  """`eval_step` of `config`, jitted over `mesh` like `make_train_step`."""
  replicated, data_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))
  state_sharding = replicated if state_sharding is None else state_sharding
  return jax.jit(functools.partial(eval_step, normalize=normalizer(config)),
                 in_shardings=(state_sharding, data_sharding), out_shardings=replicated)


def _to_global(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def prefetch_to_mesh(batches: Iterator[dict[str, np.ndarray]], sharding: NamedSharding,
                     size: int = 2) -> Iterator[dict[str, jax.Array]]:
  """Keeps `size` global batches in flight to the devices ahead of the step."""
  queue = collections.deque()
  for batch in batches:
    queue.append(_to_global(batch, sharding))
    if len(queue) > size:
      yield queue.popleft()
  yield from queue


def evaluate(p_eval, state: TrainState, batches, sharding: NamedSharding) -> dict[str, float]:
  """Loss, top-1 and top-5 over every example of the split."""
  totals = None
  for batch in prefetch_to_mesh(batches, sharding):
    sums = p_eval(state, batch)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  count = max(float(totals.pop('count')), 1.0)
  return {f'eval_{k}': float(v) / count for k, v in totals.items()}
