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
cannot both win:
  * local disks: the lease is created by hard-linking a complete temporary
    file (atomic, fails if the lease exists, like O_CREAT|O_EXCL) and replaced
    by renaming the old one away first (only one renamer succeeds);
  * buckets (`gs://`): uploads with a generation precondition
    (`ifGenerationMatch=0` creates, `=N` replaces generation N only).
On several hosts only process 0 holds the lease.
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

from vgg_flax import storage

LEASE_FILE = 'lease.json'


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

  def create(self, data: bytes) -> bytes | None:
    tmp = f'{self.path}.{uuid.uuid4().hex}.tmp'
    with open(tmp, 'wb') as f:
      f.write(data)
    try:
      os.link(tmp, self.path)  # Atomic and never overwrites: the lease appears complete.
    except FileExistsError:
      return None
    finally:
      os.remove(tmp)
    return data

  def delete(self, version: bytes) -> bool:
    """Removes the lease if it still is `version`."""
    moved = f'{self.path}.{uuid.uuid4().hex}.old'
    try:
      os.rename(self.path, moved)  # Of several processes, one gets the file.
    except FileNotFoundError:
      return False
    with open(moved, 'rb') as f:
      current = f.read()
    if current != version:  # Changed since read: put it back, never over a newer lease.
      with contextlib.suppress(FileExistsError):
        os.link(moved, self.path)
    os.remove(moved)
    return current == version

  def replace(self, data: bytes, version: bytes) -> bytes | None:
    return self.create(data) if self.delete(version) else None


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
    blob = self._blob.bucket.get_blob(self._blob.name)
    if blob is None:
      return None
    try:
      return blob.download_as_bytes(if_generation_match=blob.generation), blob.generation
    except self._lost:
      return self.read()  # Replaced or deleted between the two requests.

  def _upload(self, data: bytes, generation: int) -> int | None:
    blob = self._blob.bucket.blob(self._blob.name)
    try:
      blob.upload_from_string(data, content_type='application/json',
                              if_generation_match=generation)
    except self._lost:
      return None
    return blob.generation

  def create(self, data: bytes) -> int | None:
    return self._upload(data, 0)

  def replace(self, data: bytes, version: int) -> int | None:
    return self._upload(data, version)

  def delete(self, version: int) -> bool:
    try:
      self._blob.bucket.blob(self._blob.name).delete(if_generation_match=version)
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
        self.lost.set()
        found = self._store.read()
        other = Holder.from_bytes(found[0]) if found else None
        logging.error('Lost the lease %s%s: another trainer may now write to this workdir.',
                      self.path, f' to host {other.host}, PID {other.pid}' if other else '')
        return False
      self.holder, self._version = holder, version
      return True

  def _refresh_loop(self, refresh_s: float) -> None:
    while not self._stop.wait(refresh_s):
      try:
        if not self.refresh():
          return
      except Exception as e:  # pylint: disable=broad-except  # Keep trying: storage blips.
        logging.warning('Could not refresh the lease %s (%s: %s); retrying in %.0f s.',
                        self.path, type(e).__name__, e, refresh_s)

  def release(self) -> None:
    """Stops refreshing and deletes the lease if it is still ours."""
    self._stop.set()
    self._thread.join()
    with self._lock:
      if not self.lost.is_set() and not self._store.delete(self._version):
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
  lease_path = os.fspath(storage.path(workdir) / LEASE_FILE)
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
      age = max(0.0, time.time() - holder.refreshed) if holder else 0.0
      reason = _stale_reason(holder, stale_after_s, age)
      if reason is None:
        raise WorkdirInUseError(
            f'workdir {os.fspath(workdir)} is in use by host {holder.host}, PID {holder.pid} '
            f'(last refresh {age:.0f} s ago). Stop that trainer or use another --workdir; '
            f'its lease ({LEASE_FILE}) is taken over once that process is gone or '
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
    The `Lease` (its `lost` event is set if another process took it over).
  """
  if process_index is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index()
  if process_index != 0:
    yield None
    return
  held = acquire(workdir, stale_after_s=stale_after_s, refresh_s=refresh_s)
  try:
    yield held
  finally:
    held.release()


def read_holder(workdir: storage.PathLike) -> Holder | None:
  """The current holder of the workdir's lease, or None (for tools and tests)."""
  found = _store(os.fspath(storage.path(workdir) / LEASE_FILE)).read()
  return Holder.from_bytes(found[0]) if found else None
