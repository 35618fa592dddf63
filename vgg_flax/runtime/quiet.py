"""The libraries' start-up chatter, kept out of what users see.

TensorFlow (here only for tf.data) logs a oneDNN notice and absl's
"All log messages before absl::InitializeLog()" warning from C++ while it is
imported, twice, whatever TF_CPP_MIN_LOG_LEVEL says; libtpu, when installed
for `vgg_flax.aot` on a machine without a TPU, logs its failed probe on every
JAX start, and JAX's CUDA plugin without a GPU that it finds no driver; orbax
warns on every restore of a checkpoint item (`KNOWN_WARNINGS`). None of it
tells a user anything. The product's own warnings, any other library warning,
and any error while importing still reach stderr.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import importlib.util
import logging
import os
import re
import sys
import tempfile
from types import ModuleType

from absl import logging as absl_logging

# Library warnings that are no news: (part of the logging module's path, the whole message).
KNOWN_WARNINGS = (
    # Orbax reads a step's metadata from each item it restores; vgg_flax restores
    # the item checkpoints/<kind>/<step>/state, and the file is one folder up.
    ('/orbax/', r'Metadata file does not exist: .*/_CHECKPOINT_METADATA'),
    # tfds, before it builds a dataset for the first time (the built-in digits).
    ('/tensorflow_datasets/', r'Variant folder .* has no dataset_info\.json'),
)


def configure_environment() -> None:
  """Sets the libraries' log levels; call before TensorFlow or JAX is imported."""
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  hide_known_warnings()
  if 'jax' in sys.modules:
    return
  # libtpu without a TPU, or JAX's CUDA plugin without a GPU, is there only to
  # compile for TPU topologies or GPUs (vgg_flax.aot), which works on the CPU
  # platform; JAX reads JAX_PLATFORMS when it is imported.
  tpu = importlib.util.find_spec('libtpu') is not None
  cuda = _cuda_plugin_libraries()
  idle_tpu, idle_cuda = tpu and not _tpu_devices(), bool(cuda) and not _gpu_devices()
  if 'JAX_PLATFORMS' not in os.environ and (idle_tpu or idle_cuda):
    os.environ['JAX_PLATFORMS'] = ','.join(
        [p for p, present in (('tpu', tpu and not idle_tpu), ('cuda', bool(cuda) and not idle_cuda))
         if present] + ['cpu'])
  if idle_cuda:
    # Each of the plugin's libraries logs "Could not find cuda drivers" from C++
    # when loaded (at `import jax`, and when JAX looks for plugins, whatever
    # JAX_PLATFORMS says): loaded here, quietly, JAX's own loads find them loaded.
    with stderr_captured(replay_on_error=False):
      for path in cuda:
        with contextlib.suppress(OSError):
          ctypes.CDLL(path)


class _KnownWarnings(logging.Filter):
  """Drops the `KNOWN_WARNINGS` records of absl's logger (the libraries log through it)."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.levelno == logging.WARNING and any(
        part in record.pathname and re.fullmatch(message, record.getMessage())
        for part, message in KNOWN_WARNINGS))


def hide_known_warnings() -> None:
  """Keeps `KNOWN_WARNINGS` out of the log, whatever handler writes it; idempotent."""
  logger = absl_logging.get_absl_logger()
  if not any(isinstance(f, _KnownWarnings) for f in logger.filters):
    logger.addFilter(_KnownWarnings())


def _tpu_devices() -> list[str]:
  """The device files of TPU chips on this host (v2-v3: /dev/accel*, v4+: /dev/vfio/N)."""
  return glob.glob('/dev/accel*') + glob.glob('/dev/vfio/[0-9]*')


def _gpu_devices() -> list[str]:
  """The device files of NVIDIA GPUs on this host."""
  return glob.glob('/dev/nvidia[0-9]*')


def _cuda_plugin_libraries() -> list[str]:
  """The shared libraries of JAX's CUDA plugin (its kernels and its PJRT client), if installed."""
  paths = []
  for name in ('jax_cuda12_plugin', 'jax_cuda13_plugin', 'jax_plugins.xla_cuda12',
               'jax_plugins.xla_cuda13'):
    with contextlib.suppress(ImportError):
      spec = importlib.util.find_spec(name)
      for folder in (spec.submodule_search_locations or []) if spec else []:
        paths += sorted(glob.glob(os.path.join(folder, '*.so')))
  return paths


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
  # TensorFlow imports Keras' optimizers eagerly when Keras is installed (it is
  # one of its dependencies): `import vgg_flax.train` took 5.7 s with them, 4.8 s
  # without. Only tf.data is used here; Keras registers them itself when imported.
  eager_keras = 'keras.src.optimizers'
  blocked = eager_keras not in sys.modules
  if blocked:
    sys.modules[eager_keras] = None  # An ImportError, which TensorFlow skips.
  try:
    with stderr_captured():
      import tensorflow  # pylint: disable=g-import-not-at-top
  finally:
    if blocked and sys.modules.get(eager_keras, 0) is None:
      del sys.modules[eager_keras]
  return tensorflow
