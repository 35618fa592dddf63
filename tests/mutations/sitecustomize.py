"""Mutations of vgg_flax for the suite's mutation check (`make mutation-check`).

With this folder on PYTHONPATH and VGG_FLAX_MUTATION set, every Python process
(pytest and the trainers, sweeps and Ray workers it starts, which inherit the
environment) imports vgg_flax with the named defect. Under a mutation, tests
marked `resume` are expected to fail (tests/conftest.py): a test that still
passes cannot tell the property from its absence.

  no_restore: the trainer ignores its checkpoints and starts again from step 0,
    the defect that no resume test could tell from a resume (issue 25).
"""

import importlib.abc
import os
import sys


def _no_restore(module):
  """checkpoint.restore_or_init as if the workdir held no checkpoint."""
  restore_or_init = module.restore_or_init

  class _NoCheckpoints:
    def __init__(self, ckpt):
      self.workdir = ckpt.workdir

    def restore(self, state, **kwargs):  # pylint: disable=unused-argument
      return None

  module.restore_or_init = lambda ckpt, *args: restore_or_init(_NoCheckpoints(ckpt), *args)


MUTATIONS = {'no_restore': ('vgg_flax.training.checkpoint', _no_restore)}


class _PatchAfterImport(importlib.abc.MetaPathFinder):
  """Applies `patch` to module `name` right after it is first executed."""

  def __init__(self, name, patch):
    self.name, self.patch = name, patch

  def find_spec(self, fullname, path, target=None):
    if fullname != self.name:
      return None
    for finder in sys.meta_path:
      spec = None if finder is self else finder.find_spec(fullname, path, target)
      if spec is not None:
        break
    else:
      return None
    exec_module = spec.loader.exec_module

    def exec_and_patch(module):
      exec_module(module)
      self.patch(module)
    spec.loader.exec_module = exec_and_patch
    return spec


_mutation = os.environ.get('VGG_FLAX_MUTATION')
if _mutation:
  if _mutation not in MUTATIONS:
    raise SystemExit(f'VGG_FLAX_MUTATION={_mutation!r} is not allowed: expected one of '
                     f'{", ".join(MUTATIONS)}.')
  sys.meta_path.insert(0, _PatchAfterImport(*MUTATIONS[_mutation]))
