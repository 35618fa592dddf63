"""config.profile_steps: a jax.profiler trace of a few training steps, in the workdir.

The trace goes to WORKDIR/plugins/profile/<run>/, where `tensorboard --logdir
WORKDIR` shows it in its profile tab. The profiler writes to a local folder
(its own file system layer does not know buckets or their emulator); for a
`gs://` workdir the files are then copied there through vgg_flax.io.storage.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from absl import logging
import jax

from vgg_flax.io import storage
from vgg_flax.io import workdirs


class StepProfiler:
  """Starts a trace before step `first` and stops it after step `last` has run."""

  def __init__(self, workdir: str, steps: tuple[int, ...]):
    self._workdir = workdirs.Workdir(workdir)
    self._first, self._last = steps if steps else (0, -1)
    self._local = None  # The folder the profiler writes, while tracing.

  def before(self, step: int) -> None:
    if step == self._first and jax.process_index() == 0:
      remote = storage.is_remote(self._workdir.path)
      self._local = tempfile.mkdtemp(prefix='vgg_flax_profile_') if remote else os.fspath(
          self._workdir.path)
      jax.profiler.start_trace(self._local)

  def after(self, step: int, state: Any) -> None:
    if step != self._last or self._local is None:
      return
    jax.block_until_ready(state)  # The traced steps end on the device, not at dispatch.
    jax.profiler.stop_trace()
    if storage.is_remote(self._workdir.path):
      for root, _, files in os.walk(self._local):
        for name in files:
          path = os.path.join(root, name)
          storage.write_bytes(self._workdir.path / os.path.relpath(path, self._local),
                              open(path, 'rb').read())
    logging.info('Profiled steps %d-%d into %s (tensorboard --logdir %s, profile tab).',
                 self._first, self._last, self._workdir.profile, self._workdir.path)
    self._local = None
