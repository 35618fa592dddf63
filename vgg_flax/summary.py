"""A Keras-style layer table of a model: name, output shape, parameters.

Shapes come from `jax.eval_shape`, so summarising VGG-16 at 224 px allocates
no parameters and computes nothing.

Usage:
  python -m vgg_flax.summary --config=configs/vgg16.py --config.model.depth=19
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple, Sequence

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags

from vgg_flax import config as config_lib
from vgg_flax import models
from vgg_flax.runtime import cli

# Layers without parameters or shape change that would only clutter the table.
_SKIPPED = (nn.Dropout,)


class LayerRow(NamedTuple):
  name: str  # Module path, '/'-joined ('block1_conv1').
  output_shape: tuple[int, ...]
  num_params: int  # In the 'params' collection only.


def _trace(model: nn.Module, input_shape: Sequence[int]) -> tuple[list[LayerRow], Any]:
  """Initialises `model` abstractly, recording each layer call in order."""
  calls = []

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    module = context.module
    if (context.method_name == '__call__' and module.path
        and not isinstance(module, _SKIPPED)):
      calls.append((module.path, tuple(out.shape)))
    return out

  def init():
    with nn.intercept_methods(record):
      return model.init(jax.random.key(0), jnp.zeros(input_shape, jnp.float32))

  variables = jax.eval_shape(init)
  params = variables.get('params', {})
  rows = []
  for path, shape in calls:
    subtree = params
    for part in path:
      subtree = subtree.get(part, {}) if isinstance(subtree, Mapping) else {}
    rows.append(LayerRow('/'.join(path), shape, models.count_params(subtree)))
  return rows, variables


def layer_rows(model: nn.Module, input_shape: Sequence[int]) -> list[LayerRow]:
  """Every layer of `model` in call order (dropout left out).

  Args:
    model: an unbound Flax module taking one NHWC array (`train` defaulted).
    input_shape: e.g. (1, 224, 224, 3).

  Returns:
    (name, output_shape, num_params) rows, `LayerRow` named tuples.
  """
  return _trace(model, input_shape)[0]


def format_table(rows: Sequence[tuple[str, tuple[int, ...], int]],
                 num_batch_stats: int = 0) -> str:
  """Formats `layer_rows` output as a table followed by the totals.

  Args:
    rows: (name, output_shape, num_params) tuples.
    num_batch_stats: BatchNorm running statistics, shown when non-zero (they
      are neither trainable nor counted in the totals, like torchvision).

  Returns:
    The table, without a trailing newline.
  """
  header = ('Layer', 'Output shape', 'Params')
  body = [(name, str(tuple(shape)), f'{n:,}') for name, shape, n in rows]
  widths = [max(len(r[i]) for r in [header] + body) for i in range(3)]

  def line(r):
    return f'{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}'

  rule = '-' * len(line(header))
  total = sum(n for _, _, n in rows)
  lines = [line(header), rule] + [line(r) for r in body] + [rule]
  # Every parameter is trained; the trainer has no frozen layers.
  lines += [f'Total params: {total:,}', f'Trainable params: {total:,}']
  if num_batch_stats:
    lines.append(f'Batch statistics: {num_batch_stats:,} (not trainable, not in the total)')
  return '\n'.join(lines)


def summarize(model: nn.Module, input_shape: Sequence[int]) -> str:
  """The formatted table of `model`, batch statistics included."""
  rows, variables = _trace(model, input_shape)
  return format_table(rows, models.count_params(variables.get('batch_stats', {})))


def input_spec(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """(num_classes, channels) for `config`.

  `config.model.num_classes` when set (channels from `config.input.mean`);
  else the dataset's; else, when the dataset cannot be inspected, 1000
  classes and `len(config.input.mean)` channels, saying so.
  """
  channels = len(config.input.mean)
  if config.model.num_classes is not None:
    return config.model.num_classes, channels
  try:
    # Imported here: the summary should work even where tfds is unusable.
    from vgg_flax.data import input_pipeline  # pylint: disable=g-import-not-at-top
    info = input_pipeline.dataset_info(config)
    return info.num_classes, info.num_channels
  except Exception as e:  # pylint: disable=broad-except
    print(f'Could not read the dataset info of {config.dataset!r} ({type(e).__name__}: {e}); '
          f'assuming 1000 classes and {channels} channels.')
    return 1000, channels


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = flags.FLAGS.config
  config_lib.validate(config)
  num_classes, channels = input_spec(config)
  model = models.create_model(config.model, num_classes)
  print(summarize(model, (1, config.image_size, config.image_size, channels)))


def define_flags() -> None:
  # Defined when run as a script, not at import, so that a trainer importing
  # this module can own its --config flag.
  config_flags.DEFINE_config_file(
      'config', None, 'Path to a config file (see configs/).', lock_config=True)
  flags.mark_flags_as_required(['config'])


if __name__ == '__main__':
  cli.run(main, define_flags)
