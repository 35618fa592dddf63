"""Checkpoints with orbax: the latest few, and the best by a monitored metric.

Layout under the workdir:

  checkpoints/latest/<step>/   the newest `keep` checkpoints (resume from here)
  checkpoints/best/<step>/     the single best by `checkpoint.monitor`

Each checkpoint holds the train state (params, batch_stats, opt_state, step,
rng) and a small JSON `meta` item with the trainer's host-side bookkeeping
(best metric so far, evaluations without improvement, whether training
finished). Orbax writes a step into a temporary folder and renames it when
complete, so a half-written checkpoint is never listed as a step.

Resume order: the latest checkpoint in the workdir, else a fresh state.
"""

from __future__ import annotations

import os
from typing import Any

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

    Returns:
      `(state, meta)` or None when the manager holds no checkpoint.
    """
    manager = self.best if best else self.latest
    step = manager.latest_step() if step is None else step
    if step is None:
      return None
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, _state_tree(state))
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    return state.replace(**restored['state']), dict(restored['meta'] or {})

  def wait(self) -> None:
    """Blocks until asynchronous saves are on disk."""
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def close(self) -> None:
    self.latest.close()
    self.best.close()
