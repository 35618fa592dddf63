"""Preemption: SIGTERM makes the trainer save at the current step and exit cleanly.

Preemptible TPU VMs and cluster schedulers send SIGTERM, then SIGKILL after a
grace period. On one process a signal handler sets a flag that the loop reads
after each step. On several processes they must all stop at the same step, so
the loop asks JAX's preemption sync manager (set up by
`jax.distributed.initialize`), which agrees on a step across hosts.
"""

from __future__ import annotations

import signal
import threading

import jax
from jax.experimental import multihost_utils


class Watcher:
  """Context manager; calling it with a step says whether to save and stop there."""

  def __init__(self):
    self._signalled = False
    self._previous = None

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self._signalled = True

  def __enter__(self) -> 'Watcher':
    # Signal handlers can only be installed from the main thread (tests may not be).
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def __call__(self, step: int) -> bool:
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._signalled
