"""Evaluates a trained workdir: loss, top-1 and top-5 accuracy on a split.

  python -m vgg_flax.evaluate --workdir=runs/vgg16_digits [--split=test] \
      [--checkpoint=best|latest] [--config.eval_batch_size=128 ...]

The run's own config (WORKDIR/config.json) is used, with the same evaluation
preprocessing as training; `--config.FIELD=VALUE` overrides any field of it.
"""

from __future__ import annotations

import ast
import json
import os
import sys
from typing import Any

from absl import app
from absl import flags
from absl import logging
import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import optax

from vgg_flax import config as config_lib
from vgg_flax import input_pipeline
from vgg_flax import models
from vgg_flax import train
from vgg_flax import transfer


def _tuples(value):
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a workdir was trained with (WORKDIR/config.json)."""
  path = os.path.join(workdir, train.CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} does not exist: is {workdir} a vgg_flax training workdir?')
  with open(path) as f:
    return ml_collections.ConfigDict(_tuples(json.load(f)))


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, Any] | None):
  """Sets 'a.b' -> value; strings are parsed as Python literals where they can be."""
  for key, value in (overrides or {}).items():
    if isinstance(value, str):
      try:
        value = ast.literal_eval(value)
      except (ValueError, SyntaxError):
        pass
    *parents, leaf = key.split('.')
    target = config
    for part in parents:
      target = target[part]
    if leaf not in target:
      raise KeyError(f'--config.{key}: the run config has no field {key!r}.')
    target[leaf] = _tuples(value) if isinstance(value, list) else value
  return config


def load_dataset_info(workdir: str) -> dict[str, Any]:
  """WORKDIR/dataset.json: class names, channels and the model's number of classes."""
  path = os.path.join(workdir, train.DATASET_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} does not exist; it is written when training starts.')
  with open(path) as f:
    return json.load(f)


def restore_model(workdir: str, config: ml_collections.ConfigDict, checkpoint: str = 'best'):
  """(model, variables, step) of a workdir's best (default) or latest checkpoint."""
  dataset = load_dataset_info(workdir)
  model = models.create_model(config.model, dataset['num_model_classes'])
  state_dir = transfer.find_checkpoint(workdir, checkpoint)
  variables = transfer.restore_checkpoint_variables(state_dir)
  step = int(os.path.basename(os.path.dirname(state_dir)))
  return model, variables, step


def evaluate_workdir(workdir: str, config_overrides: dict[str, Any] | None = None,
                     split: str = '', checkpoint: str = 'best') -> dict[str, float]:
  """Loss, top-1 and top-5 of a workdir's checkpoint on a split.

  Args:
    workdir: a training workdir (config.json, dataset.json, checkpoints/).
    config_overrides: {'eval_batch_size': 64, 'data_dir': ...} over the run's config.
    split: '' = the run's eval split.
    checkpoint: 'best' (falls back to latest) or 'latest'.

  Returns:
    {'eval_loss', 'eval_accuracy', 'eval_top5_accuracy', 'step', 'num_examples'}.
  """
  config = apply_overrides(load_config(workdir), config_overrides)
  config_lib.validate(config)
  model, variables, step = restore_model(workdir, config, checkpoint)
  builder = input_pipeline.get_builder(config)
  info = input_pipeline.dataset_info(config, builder)
  mesh = train.create_mesh()
  replicated, data_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))
  state = train.TrainState.create(apply_fn=model.apply, params=variables['params'],
                                  tx=optax.identity(), batch_stats=variables['batch_stats'],
                                  rng=jax.random.PRNGKey(0))
  state = jax.device_put(state, replicated)
  p_eval = jax.jit(train.eval_step, in_shardings=(replicated, data_sharding),
                   out_shardings=replicated)
  split = split or info.eval_split
  batches = input_pipeline.eval_batches(config, builder, info, split)
  results = train.evaluate(p_eval, state, batches, data_sharding)
  num_examples = (info.num_eval_examples if split == info.eval_split
                  else builder.info.splits[split].num_examples)
  return {**results, 'step': step, 'num_examples': num_examples}


def define_flags() -> None:
  """The CLI's flags; defined only when run as a script (vgg_flax.train defines --workdir)."""
  if 'workdir' not in flags.FLAGS:
    flags.DEFINE_string('workdir', None, 'A training workdir.')
  flags.mark_flag_as_required('workdir')
  flags.DEFINE_string('split', '', "Split to evaluate; '' = the run's eval split.")
  flags.DEFINE_enum('checkpoint', 'best', ('best', 'latest'), 'Which checkpoint.')


def split_config_overrides(argv: list[str]) -> tuple[list[str], dict[str, str]]:
  """Takes the --config.FIELD=VALUE arguments out of argv."""
  rest, overrides = [], {}
  for arg in argv:
    if arg.startswith('--config.') and '=' in arg:
      key, value = arg[len('--config.'):].split('=', 1)
      overrides[key] = value
    else:
      rest.append(arg)
  return rest, overrides


def main(argv, overrides):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)  # Keep orbax and tfds chatter off the output.
  f = flags.FLAGS
  r = evaluate_workdir(f.workdir, overrides, f.split, f.checkpoint)
  print(f'{f.workdir} step {r["step"]}, {r["num_examples"]} examples: '
        f'loss {r["eval_loss"]:.4f}  top-1 {r["eval_accuracy"]:.4f}  '
        f'top-5 {r["eval_top5_accuracy"]:.4f}')


if __name__ == '__main__':
  define_flags()
  _argv, _overrides = split_config_overrides(sys.argv)
  app.run(lambda argv: main(argv, _overrides), argv=_argv)
