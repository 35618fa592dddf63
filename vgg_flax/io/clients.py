"""The storage clients under `storage`: pointed at an emulator, held to one deadline.

A run reaches buckets through three clients: gcsfs under epath (`storage`'s
files), tensorstore under orbax (checkpoints) and google-cloud-storage (the
lease). They are configured here, through the variables and settings each
reads, so that they behave alike.

Deadline (`set_timeout`, config.storage.timeout_s): each request may stay
silent for an eighth of it before its client retries it (`gcs_options` for
google-cloud-storage calls); `storage.bounded` puts the whole deadline on a
wait.

Environment (`configure`, run at import): the Google Cloud convention
`STORAGE_EMULATOR_HOST=http://host:port` (an emulator such as fake-gcs-server)
is mapped to what the rest of the stack reads: tensorstore (orbax's array
storage) `TENSORSTORE_GCS_HTTP_URL`, and gcsfs without its gRPC bucket-type
probe. `EPATH_USE_TF=false` makes epath reach `gs://` through gcsfs (which
honours the emulator) instead of tf.io.gfile (which does not).
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
from typing import Any

from etils import epath

# Values configure() and set_timeout() wrote (NAME=value;...), so a later call
# (say, after a test started an emulator, or a trainer started by a sweep with
# its own timeout) updates them but never overrides what the user set. In the
# environment: child processes inherit it with the values.
_SET_BY_US = 'VGG_FLAX_STORAGE_ENV'


def _set_env(name: str, value: str) -> None:
  ours = dict(item.split('=', 1) for item in os.environ.get(_SET_BY_US, '').split(';') if item)
  if name not in os.environ or os.environ[name] == ours.get(name):
    os.environ[name] = ours[name] = value
    os.environ[_SET_BY_US] = ';'.join(f'{k}={v}' for k, v in ours.items())


def configure() -> None:
  """Points the storage stack at `STORAGE_EMULATOR_HOST` if set; idempotent.

  Called at import; call it again after changing `STORAGE_EMULATOR_HOST` in
  the running process. Variables the user set are left as they are.
  """
  if importlib.util.find_spec('gcsfs') is not None:
    # With TensorFlow installed, epath sends gs:// to tf.io.gfile, which knows
    # nothing of emulators; gcsfs does. epath reads this once and caches it
    # (gpath._is_tf_installed) at the first path operation, local or not.
    _set_env('EPATH_USE_TF', 'false')
    gpath = sys.modules.get('etils.epath.gpath')
    if gpath is not None and hasattr(gpath, '_is_tf_installed'):
      gpath._is_tf_installed.cache_clear()  # pylint: disable=protected-access
    # gcsfs caches folder listings for the life of the process; other processes
    # (the trainer seen from a sweep or from evaluate, tensorstore's writes)
    # change them behind its back. One request per check is cheap next to that.
    import fsspec.config  # pylint: disable=g-import-not-at-top
    fsspec.config.conf.setdefault('gs', {}).setdefault('use_listings_cache', False)
  _apply_timeout()
  emulator = os.environ.get('STORAGE_EMULATOR_HOST', '')
  if emulator in ('', 'default'):
    return
  url = emulator if '://' in emulator else f'http://{emulator}'
  _set_env('TENSORSTORE_GCS_HTTP_URL', url)
  # gcsfs >= 2025 first asks the storage-control gRPC API for the bucket type;
  # an emulator has no such API and the call can stall for a minute per
  # bucket. gcsfs reads this at import.
  _set_env('GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT', 'false')
  gcsfs = sys.modules.get('gcsfs')
  if gcsfs is not None and gcsfs.GCSFileSystem is not gcsfs.core.GCSFileSystem:
    import fsspec  # pylint: disable=g-import-not-at-top
    for protocol in ('gs', 'gcs'):
      fsspec.register_implementation(protocol, gcsfs.core.GCSFileSystem, clobber=True)


DEFAULT_TIMEOUT_S = 600.0
_ATTEMPTS = 8  # A request may be silent for timeout_s / _ATTEMPTS before it is retried.
_timeout_s = DEFAULT_TIMEOUT_S


def set_timeout(timeout_s: float) -> None:
  """Bounds how long anything waits on storage that does not answer (config.storage.timeout_s).

  tensorstore reads its part (environment variables) at its first request:
  call this before the first checkpoint is read or written.
  """
  global _timeout_s
  if not timeout_s > 0:
    raise ValueError(f'storage timeout_s={timeout_s} must be positive.')
  _timeout_s = float(timeout_s)
  _apply_timeout()


def timeout_s() -> float:
  """The deadline set by `set_timeout` (default DEFAULT_TIMEOUT_S)."""
  return _timeout_s


def _attempt_s() -> int:
  return max(1, math.ceil(_timeout_s / _ATTEMPTS))


def _apply_timeout() -> None:
  attempt = str(_attempt_s())
  # tensorstore (curl): a transfer under 1 byte/s for `attempt` seconds is aborted and retried.
  _set_env('TENSORSTORE_CURL_CONNECT_TIMEOUT_SECONDS', attempt)
  _set_env('TENSORSTORE_CURL_LOW_SPEED_TIME_SECONDS', attempt)
  _set_env('TENSORSTORE_CURL_LOW_SPEED_LIMIT_BYTES', '1')
  if 'gcsfs' in sys.modules:  # Else at the first bucket path: aiohttp takes 0.15 s to import.
    configure_gcsfs()


_gcsfs_timeout_s = None  # The deadline gcsfs was configured for.


def configure_gcsfs() -> None:
  """gcsfs (aiohttp) by the deadline: its default is 5 minutes per request, tried 6 times.

  `storage.path` calls it at the first bucket path.
  """
  global _gcsfs_timeout_s
  if _gcsfs_timeout_s == _timeout_s or importlib.util.find_spec('gcsfs') is None:
    return
  import aiohttp  # pylint: disable=g-import-not-at-top
  import fsspec.config  # pylint: disable=g-import-not-at-top
  # Silence, not a total: a long transfer that progresses is never cut.
  fsspec.config.conf.setdefault('gs', {})['requests_timeout'] = aiohttp.ClientTimeout(
      total=None, sock_connect=_attempt_s(), sock_read=_attempt_s())
  gcsfs = sys.modules.get('gcsfs')
  if gcsfs is not None:  # File systems made before (epath keeps its own) take the new setting.
    gcsfs.GCSFileSystem.clear_instance_cache()
    epath.backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
  _gcsfs_timeout_s = _timeout_s


def gcs_options() -> dict[str, Any]:
  """`timeout=` and `retry=` for google-cloud-storage calls, by the same deadline.

  Only for calls that are safe to repeat (reads, and writes with a generation
  precondition).
  """
  from google.cloud.storage import retry  # pylint: disable=g-import-not-at-top
  return {'timeout': (_attempt_s(), _attempt_s()),
          'retry': retry.DEFAULT_RETRY.with_timeout(_timeout_s)}


configure()
