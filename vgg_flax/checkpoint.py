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
then a fresh state.
"""

from __future__ import annotations

import os
from typing import Any

from absl import logging
import jax
import orbax.checkpoint as ocp

STATE_FIELDS = ('step', 'params', 'batch_stats', 'opt_state', 'rng')


def _state_tree(state) -> dict[str, Any]:
  return {name: getattr(state, name) for name in STATE_FIELDS}


class Checkpointer:
  """The latest-N and best-1 checkpoint managers of one workdir."""

  def __init__(self, workdir: str, *, keep: int):
    root = os.path.join(os.path.abspath(workdir), 'checkpoints')
    item_names = ('state', 'meta')
    self.latest = ocp.CheckpointManager(
        os.path.join(root, 'latest'), item_names=item_names,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))
    self.best = ocp.CheckpointManager(
        os.path.join(root, 'best'), item_names=item_names,
        options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True))

  def latest_step(self) -> int | None:
    return self.latest.latest_step()

  def save(self, state, meta: dict[str, Any], *, best: bool = False) -> None:
    """Saves `state` as the latest checkpoint (and as the best one if `best`)."""
    step = int(jax.device_get(state.step))
    args = ocp.args.Composite(state=ocp.args.StandardSave(_state_tree(state)),
                              meta=ocp.args.JsonSave(meta))
    if self.latest.latest_step() != step:
      self.latest.save(step, args=args)
    if best:
      self.best.save(step, args=args)

  def restore(self, state, *, best: bool = False, step: int | None = None):
    """Restores into the shapes and shardings of `state`; None if nothing saved.

    Without `step`, tries the saved steps newest first: a checkpoint that fails
    to restore (truncated or corrupt files) is skipped with a warning, and kept
    on disk for inspection.

    Returns:
      `(state, meta)`, or None when there is no checkpoint at all.

    Raises:
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
        if step is not None:
          raise
        logging.warning('Checkpoint %s/%d does not restore (%s: %s); trying an older one.',
                        manager.directory, candidate, type(e).__name__, str(e)[:300])
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

  def wait(self) -> None:
    """Blocks until asynchronous saves are on disk."""
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def close(self) -> None:
    self.latest.close()
    self.best.close()
