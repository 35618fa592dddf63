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

Every change is a compare-and-swap, so two trainers racing for one workdir
cannot both win, and the lease never disappears while it is held:
  * local disks: the lease is created by hard-linking a complete temporary
    file (atomic, fails if the lease exists, like O_CREAT|O_EXCL); it is
    replaced or deleted under an exclusive `flock` of the lease file itself,
    checked to still be the current one, by renaming a complete temporary file
    over it (a reader sees the old or the new lease, never none);
  * buckets (`gs://`): uploads with a generation precondition
    (`ifGenerationMatch=0` creates, `=N` replaces generation N only). A
    request whose answer was lost is retried by the client and then fails its
    precondition although it landed: a lease that still carries this holder's
    token is recognised as its own, never as a takeover.
On several hosts only process 0 holds the lease. Requests to a bucket follow
`storage`'s deadline; `Lease.failed()` says when the lease could not be
refreshed for that long (the trainer stops).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from typing import Iterator

from absl import logging

from vgg_flax.io import storage
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


class _LocalStore:
  """The lease file on a local (or network) file system; a version is its content."""

  def __init__(self, p: str):
    self.path = p

  def read(self) -> tuple[bytes, bytes] | None:
    try:
      with open(self.path, 'rb') as f:
        data = f.read()
    except FileNotFoundError:
      return None
    return data, data

  def _write_temporary(self, data: bytes) -> str:
    tmp = f'{self.path}.{uuid.uuid4().hex}.tmp'
    with open(tmp, 'wb') as f:
      f.write(data)
    return tmp

  def create(self, data: bytes) -> bytes | None:
    tmp = self._write_temporary(data)
    try:
      os.link(tmp, self.path)  # Atomic and never overwrites: the lease appears complete.
    except FileExistsError:
      return None
    finally:
      os.remove(tmp)
    return data

  @contextlib.contextmanager
  def _locked(self) -> Iterator[bytes | None]:
    """Holds an exclusive lock on the current lease file; yields its content (None: no lease).

    Whoever changes the lease holds this lock, and a lease replaced or deleted
    while we waited for it is looked up again, so a change made under it is a
    compare-and-swap. The kernel drops the lock if the process dies.
    """
    while True:
      try:
        fd = os.open(self.path, os.O_RDWR)  # Writable: NFS maps flock to fcntl locks.
      except FileNotFoundError:
        yield None
        return
      try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
          now = os.stat(self.path)
        except FileNotFoundError:
          now = None
        locked = os.fstat(fd)
        if now is not None and (now.st_dev, now.st_ino) == (locked.st_dev, locked.st_ino):
          with open(fd, 'rb', closefd=False) as f:
            yield f.read()
          return
      finally:
        os.close(fd)

  def replace(self, data: bytes, version: bytes) -> bytes | None:
    with self._locked() as current:
      if current != version:
        return None
      tmp = self._write_temporary(data)
      try:
        os.replace(tmp, self.path)  # Atomic: the lease is never absent, even for a moment.
      except BaseException:
        os.remove(tmp)
        raise
    return data

  def delete(self, version: bytes) -> bool:
    """Removes the lease if it still is `version`."""
    with self._locked() as current:
      if current != version:
        return False
      os.remove(self.path)
    return True


class _GcsStore:
  """The lease object in a bucket; a version is the object's generation."""

  def __init__(self, p: str):
    from google.cloud import storage as gcs  # pylint: disable=g-import-not-at-top
    from google.api_core import exceptions  # pylint: disable=g-import-not-at-top
    bucket, name = p.split('://', 1)[1].split('/', 1)
    # project=None: no project is needed for objects of an existing bucket.
    self._blob = gcs.Client(project=None).bucket(bucket).blob(name)
    self._lost = (exceptions.PreconditionFailed, exceptions.NotFound)

  def read(self) -> tuple[bytes, int] | None:
    blob = self._blob.bucket.get_blob(self._blob.name, **storage.gcs_options())
    if blob is None:
      return None
    try:
      return (blob.download_as_bytes(if_generation_match=blob.generation,
                                     **storage.gcs_options()), blob.generation)
    except self._lost:
      return self.read()  # Replaced or deleted between the two requests.

  def _upload(self, data: bytes, generation: int) -> int | None:
    blob = self._blob.bucket.blob(self._blob.name)
    try:
      blob.upload_from_string(data, content_type='application/json',
                              if_generation_match=generation, **storage.gcs_options())
    except self._lost:
      return None
    return blob.generation

  def create(self, data: bytes) -> int | None:
    return self._upload(data, 0)

  def replace(self, data: bytes, version: int) -> int | None:
    return self._upload(data, version)

  def delete(self, version: int) -> bool:
    try:
      self._blob.bucket.blob(self._blob.name).delete(if_generation_match=version,
                                                     **storage.gcs_options())
    except self._lost:
      return False
    return True


def _store(lease_path: str):
  if storage.is_remote(lease_path):
    if not lease_path.startswith('gs://'):
      raise ValueError(f'{lease_path}: leases on buckets are implemented for gs:// only.')
    return _GcsStore(lease_path)
  return _LocalStore(lease_path)


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
    if self.lost.is_set() or silent <= storage.timeout_s():
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
  store = _store(lease_path)
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


def read_holder(workdir: storage.PathLike) -> Holder | None:
  """The current holder of the workdir's lease, or None (for tools and tests)."""
  found = _store(os.fspath(workdirs.Workdir(workdir).lease)).read()
  return Holder.from_bytes(found[0]) if found else None
