"""A small file changed only by compare-and-swap, on a local disk or in a bucket.

Each write names the version it replaces and fails (returns None or False)
if the file changed meanwhile, so two processes racing for the file cannot
both win, and the file is never absent while it is replaced:
  * local disks: it is created by hard-linking a complete temporary file
    (atomic, fails if the file exists, like O_CREAT|O_EXCL); it is replaced or
    deleted under an exclusive `flock` of the file itself, checked to still be
    the current one, by renaming a complete temporary file over it (a reader
    sees the old or the new content, never none);
  * buckets (`gs://`): uploads with a generation precondition
    (`ifGenerationMatch=0` creates, `=N` replaces generation N only), with
    `clients`' deadline. A request whose answer was lost is retried by the
    client and may then fail its precondition although it landed: the caller
    tells its own write from another's by the content.

Both kinds have `read() -> (data, version) | None`, `create(data)`,
`replace(data, version)` (the new version, or None if the file changed) and
`delete(version) -> bool`. The workdir's lease (`training.lease`) is one.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import uuid
from typing import Iterator

from vgg_flax.io import clients
from vgg_flax.io import storage


class LocalFile:
  """A file on a local (or network) file system; a version is its content."""

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
      os.link(tmp, self.path)  # Atomic and never overwrites: the file appears complete.
    except FileExistsError:
      return None
    finally:
      os.remove(tmp)
    return data

  @contextlib.contextmanager
  def _locked(self) -> Iterator[bytes | None]:
    """Holds an exclusive lock on the current file; yields its content (None: no file).

    Whoever changes the file holds this lock, and a file replaced or deleted
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
        os.replace(tmp, self.path)  # Atomic: the file is never absent, even for a moment.
      except BaseException:
        os.remove(tmp)
        raise
    return data

  def delete(self, version: bytes) -> bool:
    """Removes the file if it still is `version`."""
    with self._locked() as current:
      if current != version:
        return False
      os.remove(self.path)
    return True


class GcsObject:
  """An object in a bucket; a version is the object's generation."""

  def __init__(self, p: str):
    from google.cloud import storage as gcs  # pylint: disable=g-import-not-at-top
    from google.api_core import exceptions  # pylint: disable=g-import-not-at-top
    bucket, name = p.split('://', 1)[1].split('/', 1)
    # project=None: no project is needed for objects of an existing bucket.
    self._blob = gcs.Client(project=None).bucket(bucket).blob(name)
    self._lost = (exceptions.PreconditionFailed, exceptions.NotFound)

  def read(self) -> tuple[bytes, int] | None:
    blob = self._blob.bucket.get_blob(self._blob.name, **clients.gcs_options())
    if blob is None:
      return None
    try:
      return (blob.download_as_bytes(if_generation_match=blob.generation,
                                     **clients.gcs_options()), blob.generation)
    except self._lost:
      return self.read()  # Replaced or deleted between the two requests.

  def _upload(self, data: bytes, generation: int) -> int | None:
    blob = self._blob.bucket.blob(self._blob.name)
    try:
      blob.upload_from_string(data, content_type='application/json',
                              if_generation_match=generation, **clients.gcs_options())
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
                                                     **clients.gcs_options())
    except self._lost:
      return False
    return True


def at(p: str) -> LocalFile | GcsObject:
  """The file `p`: local, or an object in a `gs://` bucket."""
  if storage.is_remote(p):
    if not p.startswith('gs://'):
      raise ValueError(f'{p}: compare-and-swap on buckets is implemented for gs:// only.')
    return GcsObject(p)
  return LocalFile(p)
