"""File access for run folders: one API for local disks and buckets (`gs://`).

Every artifact of a run (config.json, dataset.json, metrics.jsonl, TensorBoard
events, checkpoints, result.json, curves.png) goes through here or through
orbax, and both speak `etils.epath`, the path layer orbax itself uses. So
`--workdir=runs/x` and `--workdir=gs://bucket/runs/x` run the same code.

Object stores differ from disks in three ways this module hides:
  * no folders: `makedirs` is a no-op there (and never creates a bucket);
  * no appends: `AppendFile` keeps the content in memory and rewrites the
    object (one PUT, atomic) at most every few seconds and on close;
  * no free-space figure: `free_bytes` is None.

Storage that stops answering: one deadline for every client a run uses, set
in `clients` (config.storage.timeout_s). `bounded` puts it on waits inside
libraries that set none; past it a `StorageTimeoutError` names the bucket and
what was being done. `clients` also points the clients at an emulator
(`STORAGE_EMULATOR_HOST`) when this module is imported.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import threading
import time
import uuid
from typing import Any, Callable, TypeVar, Union

from etils import epath

from vgg_flax.io import clients

PathLike = Union[str, os.PathLike]
T = TypeVar('T')


class StorageTimeoutError(TimeoutError):
  """Storage did not answer within the deadline (`clients.set_timeout`)."""


def is_timeout(e: BaseException) -> bool:
  """Whether `e` (or what caused it) says that storage did not answer in time."""
  import requests  # pylint: disable=g-import-not-at-top
  seen = set()
  while e is not None and id(e) not in seen:
    if isinstance(e, (TimeoutError, requests.exceptions.Timeout)):
      return True
    if type(e).__name__ == 'RetryError' or str(e).lstrip().startswith('DEADLINE_EXCEEDED'):
      return True  # google-api-core gave up retrying; tensorstore's status.
    seen.add(id(e))
    e = e.__cause__ or e.__context__
  return False


def timeout_error(doing: str, where: PathLike, seconds: float) -> StorageTimeoutError:
  """The error for storage at `where` silent for `seconds` while `doing` (e.g. 'writing x')."""
  where = os.fspath(where)
  place = f'bucket {_bucket_root(where)}' if is_remote(where) else f'the storage of {where}'
  return StorageTimeoutError(
      f'{place} did not answer for {seconds:.0f} s while {doing}; stopped '
      f'(config.storage.timeout_s={clients.timeout_s():g}). What was saved before is kept: '
      'run the same command again once the storage answers.')


def bounded(fn: Callable[[], T], *, doing: str, where: PathLike) -> T:
  """`fn()`, waited on for at most the deadline: past it, a `StorageTimeoutError`.

  Also for waits inside libraries that set no deadline of their own (orbax's
  wait for its background writes). `fn` runs in a daemon thread, left behind
  if it never returns. A client's own timeout becomes a `StorageTimeoutError`.
  """
  outcome = {}
  done = threading.Event()

  def target():
    try:
      outcome['value'] = fn()
    except BaseException as e:  # pylint: disable=broad-except  # Raised in the caller.
      outcome['error'] = e
    finally:
      done.set()

  start = time.monotonic()
  threading.Thread(target=target, name=f'storage: {doing}', daemon=True).start()
  answered = done.wait(clients.timeout_s())
  error = outcome.get('error')
  if not answered or (is_timeout(error) and not isinstance(error, StorageTimeoutError)):
    raise timeout_error(doing, where, time.monotonic() - start) from error
  if error is not None:
    raise error
  return outcome['value']


def is_remote(p: PathLike) -> bool:
  """True for `scheme://...` paths (buckets), False for local ones."""
  return '://' in os.fspath(p)


def path(p: PathLike) -> epath.Path:
  """An `epath.Path`: local paths expanded and made absolute, `gs://` kept.

  Absolute because orbax finds no checkpoint metadata under a relative path.
  """
  p = os.fspath(p)
  if is_remote(p):
    clients.configure_gcsfs()
    return epath.Path(p)
  return epath.Path(os.path.abspath(os.path.expanduser(p)))


def _call(doing: str, p: PathLike, fn: Callable[[], T]) -> T:
  """`fn()`, within the deadline on object storage (see `bounded`)."""
  if not is_remote(p):
    return fn()
  return bounded(fn, doing=f'{doing} {os.fspath(p)}', where=p)


def exists(p: PathLike) -> bool:
  return _call('looking up', p, path(p).exists)


def isdir(p: PathLike) -> bool:
  return _call('looking up', p, path(p).is_dir)


def isfile(p: PathLike) -> bool:
  return _call('looking up', p, path(p).is_file)


def listdir(p: PathLike) -> list[str]:
  """Names in a folder (or under a prefix); [] when there is none."""
  folder = path(p)
  return _call('listing', p, lambda: sorted(child.name for child in folder.iterdir())
               if folder.is_dir() else [])


def makedirs(p: PathLike) -> None:
  """Creates a local folder and its parents; a no-op on object storage.

  Buckets have no folders, and creating one on a typo'd bucket name would be
  worse than failing at the first write.
  """
  if not is_remote(p):
    os.makedirs(path(p), exist_ok=True)


def read_bytes(p: PathLike) -> bytes:
  return _call('reading', p, path(p).read_bytes)


def read_text(p: PathLike) -> str:
  return read_bytes(p).decode('utf-8')


def read_json(p: PathLike, hint: str = '') -> Any:
  """The JSON file `p`; a damaged one raises ValueError naming it, plus `hint` (what to do)."""
  try:
    return json.loads(read_text(p))
  except json.JSONDecodeError as e:
    raise ValueError(f'{os.fspath(p)} is not valid JSON ({e}: a write cut '
                     f"short?){'; ' + hint if hint else ''}.") from None


def write_bytes(p: PathLike, data: bytes) -> None:
  """Writes a whole file so that readers see the old or the new content.

  Locally: a temporary file in the same folder, renamed over the target.
  On object storage: a single upload, which is atomic by itself.
  """
  target = path(p)
  if is_remote(target):
    _call('writing', p, lambda: target.write_bytes(data))
    return
  os.makedirs(target.parent, exist_ok=True)
  tmp = f'{target}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}'
  try:
    with open(tmp, 'wb') as f:
      f.write(data)
    os.replace(tmp, target)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_text(p: PathLike, text: str) -> None:
  write_bytes(p, text.encode('utf-8'))


def write_json(p: PathLike, obj: Any, *, indent: int | None = 2) -> None:
  write_text(p, json.dumps(obj, indent=indent) + '\n')


def remove(p: PathLike, *, missing_ok: bool = True) -> None:
  """Deletes one file (object)."""
  try:
    _call('deleting', p, path(p).unlink)
  except FileNotFoundError:
    if not missing_ok:
      raise


def open_file(p: PathLike, mode: str = 'rb'):
  """A file object for readers that take one (h5py, numpy, torch.load)."""
  return path(p).open(mode)


def _bucket_root(p: epath.Path) -> epath.Path:
  scheme, rest = os.fspath(p).split('://', 1)
  return epath.Path(f'{scheme}://{rest.split("/", 1)[0]}')


def check_writable(directory: PathLike, *, probe: str = '.write_test', subject: str = 'folder',
                   hint: str = '') -> None:
  """Writes, reads back and deletes a probe file in `directory` (created if local).

  A real probe, because permissions on a bucket are only known by trying.

  Args:
    directory: a local folder or a `gs://bucket/prefix`.
    probe: the probe's file name (e.g. one per process: '.write_test.3').
    subject: what `directory` is, for the error: 'workdir', ...
    hint: appended to the error, e.g. 'Choose another --workdir.'

  Raises:
    OSError: naming the directory and the reason (a missing bucket, no
      permission, a read-only disk, ...).
  """
  d = path(directory)
  token = uuid.uuid4().hex.encode()
  try:
    makedirs(d)
    write_bytes(d / probe, token)
    if read_bytes(d / probe) != token:
      raise OSError('the probe file read back differs from what was written')
    remove(d / probe)
    return
  except OSError as e:
    reason = e.strerror or str(e)
    if is_remote(d) and isinstance(e, FileNotFoundError):
      try:
        missing = not _bucket_root(d).exists()
      except OSError:
        missing = False
      if missing:
        reason = f'bucket {_bucket_root(d)} does not exist, or these credentials cannot see it'
  raise OSError(f'{subject} {os.fspath(directory)} is not writable ({reason}).'
                + (f' {hint}' if hint else ''))


def free_bytes(directory: PathLike) -> int | None:
  """Free bytes on the disk holding `directory`; None on object storage.

  A folder that does not exist yet is measured at its nearest existing parent.
  """
  if is_remote(directory):
    return None
  d = os.path.abspath(os.fspath(directory))
  while not os.path.exists(d) and os.path.dirname(d) != d:
    d = os.path.dirname(d)
  return shutil.disk_usage(d).free


class AppendFile:
  """A file that only grows (metrics.jsonl, TensorBoard events), anywhere.

  Locally each `write` goes to the end of the file and is flushed. Objects
  cannot be appended to, so on object storage the content is kept in memory
  and the whole object rewritten by `flush`: by `write` when the last upload
  is older than `min_interval_s` (GCS allows about one update per second per
  object), and always by `flush` and `close`. These files are small.
  """

  def __init__(self, p: PathLike, *, initial: bytes | None = None,
               min_interval_s: float = 5.0):
    """Opens `p` for appending.

    Args:
      p: the file.
      initial: if given, the file is first replaced by exactly these bytes;
        otherwise existing content is kept.
      min_interval_s: on object storage, the least time between two uploads
        triggered by `write`.
    """
    self.path = path(p)
    self._min_interval_s = min_interval_s
    if initial is not None:
      write_bytes(self.path, initial)
    self._file = None
    if not is_remote(self.path):
      os.makedirs(self.path.parent, exist_ok=True)
      self._file = open(self.path, 'ab')  # pylint: disable=consider-using-with
      return
    self._buffer = io.BytesIO()
    if initial is not None:
      self._buffer.write(initial)
      self._dirty = False
    elif exists(self.path):
      self._buffer.write(read_bytes(self.path))
      self._dirty = False
    else:
      self._dirty = True  # Created on the first flush, as open('ab') would.
    self._uploaded = time.monotonic() if initial is not None else -math.inf

  def write(self, data: bytes) -> None:
    """Appends `data` (file-like name, for writers that take a file)."""
    if self._file is not None:
      self._file.write(data)
      self._file.flush()
      return
    self._buffer.write(data)
    self._dirty = True
    if time.monotonic() - self._uploaded >= self._min_interval_s:
      self.flush()

  def flush(self) -> None:
    """Makes everything appended so far visible to readers of the file."""
    if self._file is not None:
      self._file.flush()
    elif self._dirty:
      data = self._buffer.getvalue()
      _call('writing', self.path, lambda: self.path.write_bytes(data))  # One upload: atomic.
      self._dirty = False
      self._uploaded = time.monotonic()

  def size(self) -> int:
    return self._file.tell() if self._file is not None else self._buffer.tell()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
    else:
      self.flush()
