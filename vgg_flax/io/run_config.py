"""A config from a config file or read back from a run's workdir, and
`--config.FIELD=VALUE` overrides on it.

evaluate, predict, `vgg_flax.load` and the sweeps start from the config a run
was trained with (WORKDIR/config.json); sweeps and `vgg_flax.config_from` from
a config file.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import os
from typing import Any

import ml_collections

from vgg_flax import config as config_lib
from vgg_flax.io import workdirs


def _tuples(value):
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def _fill_defaults(config: ml_collections.ConfigDict, defaults: ml_collections.ConfigDict):
  for key, default in defaults.items():
    if key not in config:
      config[key] = default
    elif isinstance(default, ml_collections.ConfigDict) and isinstance(
        config[key], ml_collections.ConfigDict):
      _fill_defaults(config[key], default)


def load_config_file(path: str) -> Any:
  """Calls `get_config()` of a config file (`file.py` or `file.py:arg`), like --config."""
  path, _, arg = path.partition(':')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'config file {path} does not exist.')
  spec = importlib.util.spec_from_file_location(
      os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a workdir was trained with (WORKDIR/config.json).

  Fields the run was saved without (it predates them, like the `eval` group)
  take their `get_base_config` defaults.
  """
  config = ml_collections.ConfigDict(_tuples(workdirs.Workdir(workdir).read_config()))
  _fill_defaults(config, config_lib.get_base_config())
  return config


def _no_field(key: str, depth: int, group: Any) -> str:
  """The error for an override of no field: `key`'s part `depth` is not in `group`."""
  parts = key.split('.')
  names = list(group) if isinstance(group, ml_collections.ConfigDict) else []
  close = difflib.get_close_matches(parts[depth], names, n=1)
  hint = f' Did you mean {".".join(parts[:depth] + close)!r}?' if close else ''
  return f'--config.{key}: the run config has no field {key!r}.{hint}'


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, Any] | None):
  """Sets 'a.b' -> value; strings are parsed as Python literals where they can be.

  A single value for a tuple field is a 1-tuple: `eval.scales=256` or `'(256)'`.
  """
  for key, value in (overrides or {}).items():
    if isinstance(value, str):
      try:
        value = ast.literal_eval(value)
      except (ValueError, SyntaxError):
        pass
    *parents, leaf = key.split('.')
    target = config
    for depth, part in enumerate(parents + [leaf]):
      if not isinstance(target, ml_collections.ConfigDict) or part not in target:
        raise KeyError(_no_field(key, depth, target))
      if depth < len(parents):
        target = target[part]
    if isinstance(target[leaf], tuple) and not isinstance(value, (tuple, list)):
      value = (value,)
    target[leaf] = _tuples(value) if isinstance(value, list) else value
  return config
