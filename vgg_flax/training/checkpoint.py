"""Checkpoints with orbax: the latest few, and the best by a monitored metric.

Layout under the workdir:

  checkpoints/latest/<step>/   the newest `keep` checkpoints (resume from here)
  checkpoints/best/<step>/     the single best by `checkpoint.monitor`

Each checkpoint holds the train state (params, batch_stats, opt_state, step,
rng) and a small JSON `meta` item with the trainer's host-side bookkeeping
(best metric so far, evaluations without improvement, whether training
finished). Orbax writes a step into a temporary folder and renames it when
complete, so a half-written checkpoint is never listed as a step.

Resume order: the latest checkpoint in the workdir that restores (a corrupt or
truncated one is skipped with a warning and left on disk), then `init_from`,
then a fresh state. A checkpoint that cannot be *read* (the storage is down,
access is denied) stops the run instead: falling back to an older step would
silently throw training away over a transient error. A checkpoint of another
model stops it too, naming what differs; one whose only difference is the
optimiser state (another `config.freeze`, as in a two-stage fine-tune) can
restore its parameters into a fresh optimiser state.
"""

from __future__ import annotations

from typing import Any, Callable

from absl import logging
import jax
import ml_collections
import orbax.checkpoint as ocp

from vgg_flax.interop import transfer
from vgg_flax.io import storage
from vgg_flax.io import workdirs
from vgg_flax.training import optim

STATE_FIELDS = ('step', 'params', 'batch_stats', 'opt_state', 'rng')
# Status codes (tensorstore, gRPC) and exception types of a storage that could
# not be read, as opposed to data that was read and is wrong.
_TRANSIENT_CODES = ('UNAVAILABLE', 'DEADLINE_EXCEEDED', 'PERMISSION_DENIED', 'UNAUTHENTICATED',
                    'RESOURCE_EXHAUSTED', 'ABORTED', 'CANCELLED')
_MISSING = (FileNotFoundError, IsADirectoryError, NotADirectoryError)


class StructureMismatch(ValueError):
  """The checkpoint holds a train state of another structure; `fields` differ."""

  def __init__(self, message: str, fields: tuple[str, ...]):
    super().__init__(message)
    self.fields = fields


def is_storage_error(e: BaseException) -> bool:
  """True when `e` says the storage could not be read (retry later), not that
  the checkpoint's bytes are wrong (truncated, corrupt, missing files)."""
  if isinstance(e, (ConnectionError, TimeoutError)):
    return True
  if isinstance(e, OSError) and not isinstance(e, _MISSING):
    return True
  if type(e).__name__ == 'HttpError':  # gcsfs / google-api-core after their own retries.
    return True
  return str(e).lstrip().startswith(_TRANSIENT_CODES)


def _structure(tree: Any) -> Any:
  """A (sub)tree as orbax's checkpoint metadata spells it, arrays as their shapes.

  On disk NamedTuples (optax states) are dicts of their fields, tuples are
  lists, and empty nodes (optax's EmptyState and MaskedNode) are None. The
  structure, not only the leaves, tells optimisers apart: adam's and adamw's
  states hold the same arrays in different trees.
  """
  if tree is None:
    return None
  if isinstance(tree, tuple) and hasattr(tree, '_fields'):
    tree = dict(zip(tree._fields, tree))
  if isinstance(tree, dict):
    return {str(k): _structure(v) for k, v in tree.items()} or None
  if isinstance(tree, (list, tuple)):
    return [_structure(v) for v in tree] or None
  return tuple(tree.shape)


def _state_tree(state) -> dict[str, Any]:
  return {name: getattr(state, name) for name in STATE_FIELDS}


class Checkpointer:
  """The latest-N and best-1 checkpoint managers of one workdir."""

  def __init__(self, workdir: str, *, keep: int):
    self.workdir = workdir
    run = workdirs.Workdir(workdir)  # Local or gs://: orbax speaks epath.
    item_names = ('state', 'meta')
    self.latest = ocp.CheckpointManager(
        run.checkpoints('latest'), item_names=item_names,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))
    self.best = ocp.CheckpointManager(
        run.checkpoints('best'), item_names=item_names,
        options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True))
    self._stuck: storage.StorageTimeoutError | None = None  # A save the storage never finished.

  def latest_step(self) -> int | None:
    return self.latest.latest_step()

  def save(self, state, meta: dict[str, Any], *, best: bool = False) -> None:
    """Saves `state` as the latest checkpoint (and as the best one if `best`)."""
    step = int(jax.device_get(state.step))
    args = ocp.args.Composite(state=ocp.args.StandardSave(_state_tree(state)),
                              meta=ocp.args.JsonSave(meta))
    if self.latest.latest_step() != step:
      self._call(self.latest, lambda: self.latest.save(step, args=args))
    if best:
      if jax.process_count() > 1:
        # The two managers' background saves each hold barriers across the
        # processes; run side by side they deadlocked a two-process run.
        self.latest.wait_until_finished()
      self._call(self.best, lambda: self.best.save(step, args=args))

  def restore(self, state, *, best: bool = False, step: int | None = None,
              new_optimizer_ok: bool = False):
    """Restores into the shapes and shardings of `state`; None if nothing saved.

    Without `step`, tries the saved steps newest first: a checkpoint whose data
    is corrupt (truncated or missing files) is skipped with a warning, and kept
    on disk for inspection.

    Args:
      state: the freshly initialised train state (shapes, shardings).
      best: restore from the best checkpoint instead of the latest.
      step: restore exactly this step.
      new_optimizer_ok: when only the optimiser state differs, restore step,
        parameters, batch statistics and rng, and keep `state`'s fresh
        optimiser state (the caller logs it).

    Returns:
      `(state, meta)`, or None when there is no checkpoint at all. `meta` gets
      'new_optimizer_state': True when the optimiser state was not restored.

    Raises:
      OSError: a checkpoint could not be read (storage unavailable).
      StructureMismatch: the checkpoint holds another model or optimiser.
      RuntimeError: checkpoints exist but none restores.
    """
    manager = self.best if best else self.latest
    steps = [step] if step is not None else sorted(manager.all_steps(), reverse=True)
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, _state_tree(state))
    for candidate in steps:
      try:
        restored = manager.restore(candidate, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
      except Exception as e:  # pylint: disable=broad-except
        where = f'{manager.directory}/{candidate}'
        if is_storage_error(e):
          raise OSError(f'checkpoint {where} could not be read ({type(e).__name__}: '
                        f'{str(e)[:200]}); stopped rather than resume from an older step. '
                        'Run the same command again when the storage is reachable.') from e
        differ = self._differing_fields(manager, candidate, target)
        if differ == ('opt_state',) and new_optimizer_ok:
          return self._restore_without_optimizer(manager, candidate, state, target)
        if differ:
          what = ('the optimiser state (another optimizer, schedule or config.freeze)'
                  if differ == ('opt_state',) else 'another model: ' + ', '.join(differ))
          raise StructureMismatch(f'checkpoint {where} holds {what}; use another --workdir, '
                                  'or the config it was trained with.', differ) from None
        if step is not None:
          raise
        logging.warning('Checkpoint %s does not restore (%s: %s); trying an older one.',
                        where, type(e).__name__, str(e)[:300])
        continue
      if int(jax.device_get(restored['state']['step'])) != candidate:
        logging.warning('Checkpoint %s/%d holds another step; skipped.', manager.directory,
                        candidate)
        continue
      return state.replace(**restored['state']), dict(restored['meta'] or {})
    if steps:  # Never train over checkpoints we could not read: they may be all the user has.
      raise RuntimeError(
          f'None of the checkpoints {steps} in {manager.directory} restores into this model '
          '(see the warnings above); use another --workdir, or move them away to start over.')
    return None

  @staticmethod
  def _differing_fields(manager, step: int, target: dict[str, Any]) -> tuple[str, ...]:
    """The STATE_FIELDS whose saved structure differs from `target`'s; () if none
    (or if the metadata itself cannot be read: then the data is what is wrong)."""
    try:
      saved = ocp.StandardCheckpointer().metadata(
          manager.directory / str(step) / 'state').item_metadata.tree
    except Exception:  # pylint: disable=broad-except
      return ()
    return tuple(f for f in STATE_FIELDS
                 if _structure(saved.get(f)) != _structure(target[f]))

  @staticmethod
  def _restore_without_optimizer(manager, step: int, state, target: dict[str, Any]):
    kept = {k: v for k, v in target.items() if k != 'opt_state'}
    with ocp.PyTreeCheckpointer() as ckptr:
      restored = ckptr.restore(manager.directory / str(step) / 'state', args=ocp.args.PyTreeRestore(
          kept, restore_args=ocp.checkpoint_utils.construct_restore_args(kept),
          partial_restore=True))
    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as ckptr:
      meta = ckptr.restore(manager.directory / str(step) / 'meta')
    return state.replace(**restored), dict(meta or {}, new_optimizer_state=True)

  def wait(self) -> None:
    """Blocks until asynchronous saves are on disk, for at most storage's deadline.

    Raises:
      storage.StorageTimeoutError: the storage did not answer (again at every
        later call: the save is still stuck). Finished checkpoints are kept.
    """
    self._bounded('wait_until_finished')

  def close(self) -> None:
    self._bounded('close')

  def _bounded(self, method: str) -> None:
    for manager in (self.latest, self.best):
      self._call(manager, getattr(manager, method))

  def _call(self, manager: ocp.CheckpointManager, fn: Callable[[], Any]) -> None:
    """`fn()` (a save or a wait of `manager`) within storage's deadline.

    A save is bounded too: its synchronous part lists and creates folders
    through gcsfs, whose own retries took 52 s on a bucket silent at 20 s.
    """
    if self._stuck is not None:
      raise self._stuck
    if not storage.is_remote(manager.directory) or jax.process_count() > 1:
      # A local disk answers. On several processes orbax's waits hold barriers
      # across them: run from a helper thread, two processes deadlocked in
      # them (tests/robustness_test.py, 1 run in 3); their own timeouts apply.
      fn()
      return
    try:
      storage.bounded(fn, where=manager.directory,
                      doing=f'writing a checkpoint to {manager.directory}')
    except storage.StorageTimeoutError as e:
      self._stuck = e
      raise


def restore_or_init(ckpt: Checkpointer, state, config: ml_collections.ConfigDict,
                    changed: tuple[str, ...]):
  """The resume order (see the module docstring): the latest checkpoint that restores,
  else `config.init_from`, else `state` as it is.

  Returns:
    `(state, meta)`: meta is the trainer's bookkeeping saved with the checkpoint.
  """
  meta = {'best': None, 'evals_without_improvement': 0, 'stopped_early': False, 'eval': {}}
  restored = ckpt.restore(state, new_optimizer_ok='freeze' in changed)
  if restored:
    state, meta = restored
    logging.info('Resumed from step %d of %s.', int(state.step), ckpt.workdir)
    if meta.pop('new_optimizer_state', False):
      logging.warning('config.freeze changed (%s): restored parameters and batch statistics, '
                      'with a fresh optimiser state.', ', '.join(config.freeze) or 'nothing')
      meta.pop('plateau', None)  # The fresh state's rate starts over.
  elif config.init_from:
    state = transfer.load_init(state, config)
  if config.schedule.name == 'plateau':  # The host decides at evaluations; the state scales.
    meta.setdefault('plateau', optim.new_plateau_record())
  return state, meta
