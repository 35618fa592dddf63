"""Several processes on one run: joining them, and a clean stop when one of them dies.

On a pod every host runs the same command; `initialize` joins the processes
through JAX's coordination service. When one process dies (out of memory, a
hardware fault, SIGKILL), the others learn it in one of two ways:
  * a collective with the dead process fails at once (on CPUs, gloo's
    'Connection closed by peer'), raised at the next host sync;
  * a collective hangs (GPU and TPU interconnects): `PeerWatchdog` sees the
    dead process's heartbeat stop within `heartbeat_timeout_s`.
Either way the survivor prints one line saying a peer is gone and how to
resume, and exits with status 1 without waiting for the dead peer: not
through Python's exit (its atexit handlers would wait at the coordination
service's shutdown barrier for the dead process, then abort with a C++
trace). The checkpoint being written is left as an orbax temporary folder,
never listed as a step; the earlier ones are intact.

JAX's own coordination service aborts every process (a C++ check failure and
a fatal-error dump) once a peer has missed heartbeats for its own timeout,
counted from the peer's last heartbeat, which can be half that timeout before
the peer died. So JAX is given twice `heartbeat_timeout_s`: it cannot act
before `heartbeat_timeout_s` after a death, and the watchdog, which decides at
half of it (plus up to two of its polling periods), always stops first. With
the same timeout for both, JAX won the race in 1 run of 10 on a loaded machine.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from typing import Iterator

from absl import logging
import jax

HEARTBEAT_TIMEOUT_S = 60  # JAX's default is 100 s; a dead host costs every survivor this long.
# What a collective or the coordination service says when a peer process is gone.
_PEER_GONE = ('Connection closed by peer', 'Connection reset by peer', 'heartbeat timeout',
              'Gloo', 'CoordinationServiceError', 'failed to connect to all addresses')


def initialize(coordinator_address: str | None, num_processes: int | None,
               process_id: int | None, heartbeat_timeout_s: int = HEARTBEAT_TIMEOUT_S) -> None:
  """`jax.distributed.initialize`; a dead peer stops this process within `heartbeat_timeout_s`
  (through `stop_if_a_peer_dies`, before JAX's own abort: see the module docstring)."""
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id,
                             heartbeat_timeout_seconds=2 * heartbeat_timeout_s)
  logging.info('Process %d of %d; %d local and %d global devices.', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def is_peer_gone(error: BaseException | None) -> bool:
  """True when `error` says another process of this run is gone (several processes only)."""
  return (error is not None and jax.process_count() > 1
          and any(text in str(error) for text in _PEER_GONE))


def exit_peer_gone(workdir: str, reason: str) -> None:
  """Says a peer process is gone and how to resume, then ends this process at once."""
  first_line = reason.strip().splitlines()[0] if reason.strip() else 'no heartbeat'
  sys.stderr.write(
      f'error: a process of this {jax.process_count()}-process run is gone ({first_line[:200]}); '
      f'process {jax.process_index()} stopped. The checkpoints saved so far are kept in '
      f'{workdir}: run the same command on every host to resume.\n')
  sys.stderr.flush()
  os._exit(1)  # pylint: disable=protected-access  # See the module docstring.


@contextlib.contextmanager
def stop_if_a_peer_dies(workdir: str, heartbeat_timeout_s: int) -> Iterator[None]:
  """Turns a dead peer into `exit_peer_gone`, whether a collective fails or hangs."""
  watchdog = PeerWatchdog(workdir, heartbeat_timeout_s) if jax.process_count() > 1 else None
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except
    if is_peer_gone(e):
      exit_peer_gone(workdir, f'{type(e).__name__}: {e}')
    raise
  finally:
    if watchdog is not None:
      watchdog.stop()


class PeerWatchdog:
  """A daemon thread: this process's heartbeat in the coordination service's key-value
  store, and the others' watched; a heartbeat unchanged for half the timeout, or a
  coordination service that no longer answers, means a peer is gone."""

  def __init__(self, workdir: str, heartbeat_timeout_s: int):
    from jax._src import distributed  # pylint: disable=g-import-not-at-top  # Its client.
    self._client = distributed.global_state.client
    self._workdir, self._deadline_s = workdir, heartbeat_timeout_s / 2
    self._period_s = max(heartbeat_timeout_s / 8, 0.5)
    self._stopped = threading.Event()
    self._thread = threading.Thread(target=self._run, name='PeerWatchdog', daemon=True)
    self._thread.start()

  def stop(self) -> None:
    """Stops watching; the peers read 'done', not a heartbeat that stopped."""
    self._stopped.set()
    with contextlib.suppress(Exception):
      self._client.key_value_set(f'vgg_flax/heartbeat/{jax.process_index()}', 'done',
                                 allow_overwrite=True)

  def _run(self) -> None:
    me, count = jax.process_index(), 0
    peers = [i for i in range(jax.process_count()) if i != me]
    seen = {i: (None, time.monotonic()) for i in peers}
    while not self._stopped.wait(self._period_s):
      count += 1
      try:
        self._client.key_value_set(f'vgg_flax/heartbeat/{me}', str(count), allow_overwrite=True)
        values = {i: self._try_get(f'vgg_flax/heartbeat/{i}') for i in peers}
      except Exception as e:  # pylint: disable=broad-except  # The coordinator is gone.
        if self._stopped.is_set():
          return
        exit_peer_gone(self._workdir, f'the coordination service does not answer: {e}')
      now = time.monotonic()
      for i, value in values.items():
        if value != seen[i][0]:
          seen[i] = (value, now)
        elif value not in (None, 'done') and now - seen[i][1] > self._deadline_s and not self._stopped.is_set():
          exit_peer_gone(self._workdir, f'process {i} sent no heartbeat for '
                         f'{now - seen[i][1]:.0f} s')

  def _try_get(self, key: str) -> str | None:
    try:
      return self._client.key_value_try_get(key)
    except Exception as e:  # pylint: disable=broad-except
      if 'NOT_FOUND' in str(e):  # Not started yet.
        return None
      raise
