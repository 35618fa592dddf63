"""The libraries' start-up chatter, kept out of what users see.

TensorFlow (here only for tf.data) logs a oneDNN notice and absl's
"All log messages before absl::InitializeLog()" warning from C++ while it is
imported, twice, whatever TF_CPP_MIN_LOG_LEVEL says; libtpu, when installed
for `vgg_flax.aot` on a machine without a TPU, logs its failed probe on every
JAX start. Neither tells a user anything. The product's own warnings, and any
error while importing, still reach stderr.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import os
import sys
import tempfile
from types import ModuleType


def configure_environment() -> None:
  """Sets the libraries' log levels; call before TensorFlow or JAX is imported."""
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  # JAX reads JAX_PLATFORMS when it is imported. libtpu without a TPU is only
  # there to compile for TPU topologies, which works without the TPU backend.
  if ('JAX_PLATFORMS' not in os.environ and 'jax' not in sys.modules
      and importlib.util.find_spec('libtpu') is not None and not _tpu_devices()):
    os.environ['JAX_PLATFORMS'] = ','.join(
        [p for p in ('cuda',) if _has_cuda_plugin()] + ['cpu'])


def _tpu_devices() -> list[str]:
  """The device files of TPU chips on this host (v2-v3: /dev/accel*, v4+: /dev/vfio/N)."""
  return glob.glob('/dev/accel*') + glob.glob('/dev/vfio/[0-9]*')


def _has_cuda_plugin() -> bool:
  return any(importlib.util.find_spec(name) is not None
             for name in ('jax_cuda12_plugin', 'jax_cuda13_plugin'))


@contextlib.contextmanager
def stderr_captured(replay_on_error: bool = True):
  """Sends file descriptor 2 (C++ logging) to a file; replays it if the block
  raises, unless the exception says all (`replay_on_error=False`)."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      yield
    except BaseException:
      os.dup2(saved, 2)
      if replay_on_error:
        captured.seek(0)
        os.write(2, captured.read())
      raise
    finally:
      os.dup2(saved, 2)
      os.close(saved)


def import_tensorflow() -> ModuleType:
  """`import tensorflow`, without its C++ start-up notices."""
  if 'tensorflow' in sys.modules:
    return sys.modules['tensorflow']
  configure_environment()
  with stderr_captured():
    import tensorflow  # pylint: disable=g-import-not-at-top
  return tensorflow
