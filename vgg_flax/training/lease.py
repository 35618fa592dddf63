"""One trainer per workdir: a lease object (`lease.json`) in the workdir.

    with lease.hold(workdir):      # Raises WorkdirInUseError if another trainer runs there.
      train(...)

The lease names its holder (host, PID, the process's start time) and when it
was last refreshed; a background thread refreshes it every `refresh_s` while
the holder runs, and it is deleted on exit. A second trainer finds a live
lease and stops before any work, naming the holder. A lease is stale, and
taken over with a warning, when its process is gone from this host (a
SIGKILLed run: the PID is checked, with its start time against PID reuse) or
when it was not refreshed for `stale_after_s` (a lost host).

Every change is a compare-and-swap (`vgg_flax.io.versioned`: a hard link
and `flock` on local disks, generation preconditions in `gs://` buckets), so
two trainers racing for one workdir cannot both win, and the lease never
disappears while it is held. A request whose answer was lost is retried by
the client and then fails its precondition although it landed: a lease that
still carries this holder's token is recognised as its own, never as a
takeover.
On several hosts only process 0 holds the lease. Requests to a bucket follow
`clients`' deadline; `Lease.failed()` says when the lease could not be
refreshed for that long (the trainer stops).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import threading
import time
import uuid
from typing import Iterator

from absl import logging
import numpy as np

from vgg_flax.io import clients
from vgg_flax.io import storage
from vgg_flax.io import versioned
from vgg_flax.io import workdirs


class WorkdirInUseError(RuntimeError):
  """Another live trainer holds the workdir's lease."""


@dataclasses.dataclass
class Holder:
  """What a lease says about its holder."""
  host: str
  pid: int
  pid_start: str | None  # The process's start time in clock ticks (Linux), against PID reuse.
  started: float  # Wall-clock time the lease was taken.
  refreshed: float  # Wall-clock time of the last refresh.
  token: str  # Unique per acquisition.

  def to_bytes(self) -> bytes:
    return (json.dumps(dataclasses.asdict(self), indent=2) + '\n').encode()

  @classmethod
  def from_bytes(cls, data: bytes) -> Holder | None:
    try:
      fields = json.loads(data)
      return cls(**{f.name: fields[f.name] for f in dataclasses.fields(cls)})
    except (ValueError, KeyError, TypeError):
      return None


def _proc_stat(pid: int) -> list[bytes] | None:
  """Fields 3 and on of /proc/PID/stat (state, ..., start time at [19]); None where unknown."""
  try:
    with open(f'/proc/{pid}/stat', 'rb') as f:
      # The command name (field 2) may hold spaces: split after its ')'.
      return f.read().rsplit(b')', 1)[1].split()
  except (OSError, IndexError):
    return None


def _process_start(pid: int) -> str | None:
  """Start time of process `pid` in clock ticks since boot; None where unknown."""
  fields = _proc_stat(pid)
  return fields[19].decode() if fields and len(fields) > 19 else None


def _running_here(holder: Holder) -> bool:
  """Whether the holder's process still runs (only meaningful on its own host)."""
  try:
    os.kill(holder.pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass  # Exists, under another user.
  fields = _proc_stat(holder.pid)
  if fields is None:  # No /proc (macOS): the PID exists, take it as running.
    return True
  if fields[0] == b'Z':  # Killed, not yet reaped by its parent.
    return False
  return holder.pid_start is None or fields[19].decode() == holder.pid_start


class Lease:
  """A held lease: refreshed by a background thread until `release`."""

  def __init__(self, store, version, holder: Holder, lease_path: str, refresh_s: float):
    self.path = lease_path
    self.holder = holder
    self._store, self._version = store, version
    self._refresh_s = refresh_s
    self._refreshed_at = time.monotonic()  # Of the last successful write.
    self._lock = threading.Lock()
    self._stop = threading.Event()
    self.lost = threading.Event()  # Set when another process took the lease over.
    self._thread = threading.Thread(target=self._refresh_loop, args=(refresh_s,),
                                    name=f'lease {lease_path}', daemon=True)
    self._thread.start()

  def refresh(self) -> bool:
    """Rewrites the lease with the current time; False if it is no longer ours."""
    with self._lock:
      if self.lost.is_set() or self._stop.is_set():
        return False
      holder = dataclasses.replace(self.holder, refreshed=time.time())
      version = self._store.replace(holder.to_bytes(), self._version)
      if version is None:
        found = self._store.read()
        other = Holder.from_bytes(found[0]) if found else None
        if other is None or other.token != self.holder.token:
          self.lost.set()
          logging.error('Lost the lease %s%s: another trainer may now write to this workdir.',
                        self.path, f' to host {other.host}, PID {other.pid}' if other else '')
          return False
        # Our own write, whose answer was lost: the client retried it, and the
        # retry failed the precondition that the write itself had changed.
        logging.info('The lease %s was written by this holder already; adopting that version.',
                     self.path)
        holder, version = other, found[1]
      self.holder, self._version = holder, version
      self._refreshed_at = time.monotonic()
      return True

  def failed(self) -> storage.StorageTimeoutError | None:
    """The error to stop with if no refresh has succeeded for storage's deadline, else None.

    Checked by the holder (the trainer's loop), whatever the refresh thread is
    blocked in: past the deadline, the lease may look stale to others.
    """
    silent = time.monotonic() - self._refreshed_at - self._refresh_s
    if self.lost.is_set() or silent <= clients.timeout_s():
      return None
    return storage.timeout_error(f'refreshing the workdir lease {self.path}', self.path, silent)

  def _refresh_loop(self, refresh_s: float) -> None:
    while not self._stop.wait(refresh_s):
      try:
        if not self.refresh():
          return
      except Exception as e:  # pylint: disable=broad-except  # Keep trying: storage blips.
        logging.warning('Could not refresh the lease %s (%s: %s); retrying in %.0f s.',
                        self.path, type(e).__name__, e, refresh_s)

  def release(self, *, delete: bool = True) -> None:
    """Stops refreshing and, if `delete`, deletes the lease if it is still ours.

    Args:
      delete: False when the storage does not answer: the lease is left to be
        taken over (at once on this host, its process being gone).
    """
    self._stop.set()
    if not delete:
      logging.warning('Left the lease %s in place (its storage does not answer); the next '
                      'trainer takes it over as stale.', self.path)
      return
    self._thread.join()
    with self._lock:
      if self.lost.is_set() or self._store.delete(self._version):
        return
      found = self._store.read()  # A delete whose answer was lost is retried and fails.
      other = Holder.from_bytes(found[0]) if found else None
      if other is not None and (other.token != self.holder.token
                                or not self._store.delete(found[1])):
        logging.warning('The lease %s was changed by another process; left in place.',
                        self.path)


def _stale_reason(holder: Holder | None, stale_after_s: float, age: float) -> str | None:
  if holder is None:
    return 'it is unreadable'
  if holder.host == socket.gethostname() and not _running_here(holder):
    return f'its process {holder.pid} is gone from this host'
  if age > stale_after_s:
    return f'it was last refreshed {age:.0f} s ago, more than {stale_after_s:.0f} s'
  return None


def acquire(workdir: storage.PathLike, *, stale_after_s: float = 300.0,
            refresh_s: float = 30.0, attempts: int = 5) -> Lease:
  """Takes the lease of `workdir` (created if local), or takes over a stale one.

  Args:
    workdir: a local folder or gs:// prefix.
    stale_after_s: a lease not refreshed for this long is taken over.
    refresh_s: how often the holder refreshes it; well below `stale_after_s`.
    attempts: tries when other processes change the lease at the same time.

  Raises:
    WorkdirInUseError: a live process holds it; the message names its host,
      PID and the age of its last refresh.
  """
  if not 0 < refresh_s < stale_after_s:
    raise ValueError(f'lease refresh_s={refresh_s} must be positive and less than '
                     f'stale_after_s={stale_after_s}.')
  storage.makedirs(workdir)
  lease_path = os.fspath(workdirs.Workdir(workdir).lease)
  store = versioned.at(lease_path)
  now = time.time()
  mine = Holder(host=socket.gethostname(), pid=os.getpid(), pid_start=_process_start(os.getpid()),
                started=now, refreshed=now, token=uuid.uuid4().hex)
  for _ in range(attempts):
    version = store.create(mine.to_bytes())
    if version is None:
      found = store.read()
      if found is None:
        continue  # Released meanwhile.
      holder = Holder.from_bytes(found[0])
      if holder is not None and holder.token == mine.token:
        return Lease(store, found[1], mine, lease_path, refresh_s)  # Created; the answer was lost.
      age = max(0.0, time.time() - holder.refreshed) if holder else 0.0
      reason = _stale_reason(holder, stale_after_s, age)
      if reason is None:
        raise WorkdirInUseError(
            f'workdir {os.fspath(workdir)} is in use by host {holder.host}, PID {holder.pid} '
            f'(last refresh {age:.0f} s ago). Stop that trainer or use another --workdir; '
            f'its lease ({workdirs.LEASE_FILE}) is taken over once that process is gone or '
            f'{stale_after_s:.0f} s after its last refresh.')
      logging.warning('Taking over the lease %s of %s: %s.', lease_path,
                      f'host {holder.host}, PID {holder.pid}' if holder else 'an unknown holder',
                      reason)
      version = store.replace(mine.to_bytes(), found[1])
    if version is not None:
      return Lease(store, version, mine, lease_path, refresh_s)
  raise WorkdirInUseError(f'workdir {os.fspath(workdir)}: could not take its lease in '
                          f'{attempts} attempts; other processes keep changing {lease_path}.')


@contextlib.contextmanager
def hold(workdir: storage.PathLike, *, stale_after_s: float = 300.0, refresh_s: float = 30.0,
         process_index: int | None = None) -> Iterator[Lease | None]:
  """Holds the workdir's lease for the duration of the block (process 0 only).

  Args:
    workdir: the run folder (created if local).
    stale_after_s: see `acquire`.
    refresh_s: see `acquire`.
    process_index: this process's index among the hosts; default
      `jax.process_index()`. Other processes than 0 hold nothing (yield None).

  Yields:
    The `Lease` (its `lost` event is set if another process took it over;
    `failed()` says when its storage stopped answering). A
    `storage.StorageTimeoutError` leaving the block leaves the lease in place.
  """
  if process_index is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index()
  if process_index != 0:
    yield None
    return
  held = acquire(workdir, stale_after_s=stale_after_s, refresh_s=refresh_s)
  silent = False
  try:
    yield held
  except storage.StorageTimeoutError:
    silent = True
    raise
  finally:
    held.release(delete=not silent)


@contextlib.contextmanager
def hold_everywhere(workdir: storage.PathLike, *, stale_after_s: float,
                    refresh_s: float) -> Iterator[Lease | None]:
  """`hold` on process 0; every process stops if process 0 is refused.

  Raises:
    WorkdirInUseError: on every process, when a live trainer holds the lease.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  with contextlib.ExitStack() as stack:
    error, held = None, None
    try:
      held = stack.enter_context(hold(workdir, stale_after_s=stale_after_s,
                                      refresh_s=refresh_s))
    except WorkdirInUseError as e:
      error = e
    if jax.process_count() > 1:  # The other processes learn process 0's answer.
      ok = bool(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
      if not ok and error is None:
        error = WorkdirInUseError(f'workdir {workdir} is in use (refused on process 0).')
    if error is not None:
      raise error
    yield held


def lost_everywhere(held: Lease | None) -> bool:
  """Whether process 0 lost the workdir's lease; every process gets the same answer
  (a host sync on several processes: call it at reports and saves only)."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  lost = held is not None and held.lost.is_set()
  if jax.process_count() > 1:
    lost = bool(multihost_utils.broadcast_one_to_all(np.int32(lost)))
  return lost


def read_holder(workdir: storage.PathLike) -> Holder | None:
  """The current holder of the workdir's lease, or None (for tools and tests)."""
  found = versioned.at(os.fspath(workdirs.Workdir(workdir).lease)).read()
  return Holder.from_bytes(found[0]) if found else None
