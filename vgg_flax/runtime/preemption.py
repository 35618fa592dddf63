"""Preemption and Ctrl-C: the trainer saves at the current step and exits cleanly.

Preemptible TPU VMs and cluster schedulers send SIGTERM, then SIGKILL after a
grace period; a user at a terminal presses Ctrl-C (SIGINT). The first of
either makes the loop save at the current step and stop; a second SIGINT
aborts at once (KeyboardInterrupt), for a save that takes too long. On one
process a signal handler sets a flag that the loop reads after each step. On
several processes they must all stop at the same step, so the loop asks
JAX's preemption sync manager (set up by `jax.distributed.initialize`, which
listens to SIGTERM), which agrees on a step across hosts; a SIGINT is passed
on to it as a SIGTERM.
"""

from __future__ import annotations

import os
import signal
import threading

import jax
from jax.experimental import multihost_utils

_NAMES = {signal.SIGTERM: 'SIGTERM', signal.SIGINT: 'Ctrl-C'}


class Watcher:
  """Context manager; calling it with a step says whether to save and stop there."""

  def __init__(self):
    self.signal: str | None = None  # What asked to stop: 'SIGTERM' or 'Ctrl-C'.
    self._previous = {}

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    if signum == signal.SIGINT and self.signal == 'Ctrl-C':
      raise KeyboardInterrupt  # The second Ctrl-C.
    self.signal = self.signal or _NAMES[signum]
    if jax.process_count() > 1 and signum == signal.SIGINT:
      os.kill(os.getpid(), signal.SIGTERM)  # To JAX's preemption notifier.

  def __enter__(self) -> 'Watcher':
    # Signal handlers can only be installed from the main thread (tests may not be).
    if threading.current_thread() is threading.main_thread():
      # Several processes: JAX's notifier owns SIGTERM.
      signums = [signal.SIGINT] + ([signal.SIGTERM] if jax.process_count() == 1 else [])
      self._previous = {s: signal.signal(s, self._handle) for s in signums}
    return self

  def __exit__(self, *exc) -> None:
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}

  def __call__(self, step: int) -> bool:
    if jax.process_count() > 1:
      stop = multihost_utils.reached_preemption_sync_point(step)
      if stop and self.signal is None:
        self.signal = 'SIGTERM'
      return stop
    return self.signal is not None
