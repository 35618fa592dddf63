"""Transfer learning: start a train state from other weights, and freeze parameters.

`config.init_from` may name:
  - a training workdir (its best checkpoint, else its latest),
  - a checkpoint step folder of one (`WORKDIR/checkpoints/best/<step>`),
  - a folder written by `python -m vgg_flax.convert` (`variables/` + `weights.json`),
  - a weights file converted on the fly for `config.model`: torchvision
    `.pth`/`.pt`/`.npz`, or Keras `.h5` (VGG only: ResNet weights are not imported).
`load_init` copies every variable of the fresh train state from it, except the
'/'-joined paths matched (`re.search`) by a `config.dont_load` regex, which
keep their fresh initialisation. Resume order in `train.train_and_evaluate`:
the workdir's own latest checkpoint, else `init_from`, else scratch.

`freeze` wraps the optimiser with `optax.multi_transform`: parameters matched
by a `config.freeze` regex ('block1' ... 'block5' select whole blocks, BN
included) get `optax.set_to_zero()`, so no update and no optimiser state.
BatchNorm running statistics of frozen blocks keep updating in training, and
frozen blocks normalise with batch statistics (Keras instead runs them in
inference mode); freeze blocks of BN models knowing this, or leave them out.
"""

from __future__ import annotations

import os
import re
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from vgg_flax.interop import keras_weights
from vgg_flax.interop import weights
from vgg_flax.io import storage
from vgg_flax.io import workdirs
from vgg_flax import models

CONVERTED_ITEM = 'variables'  # Orbax PyTree of {'params', 'batch_stats'}.
CONVERTED_META = 'weights.json'
COLLECTIONS = ('params', 'batch_stats')
TRAINABLE, FROZEN = 'trainable', 'frozen'


def flatten(tree: Any) -> dict[str, Any]:
  """{'block1_conv1/kernel': leaf, ...} of a nested dict of arrays."""
  return {'/'.join(str(getattr(k, 'key', k)) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _unflatten_like(tree: Any, flat: dict[str, Any]) -> Any:
  paths = jax.tree_util.tree_flatten_with_path(tree)[0]
  leaves = [flat['/'.join(str(getattr(k, 'key', k)) for k in p)] for p, _ in paths]
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(tree), leaves)


def restore_checkpoint_variables(state_dir: storage.PathLike) -> dict[str, Any]:
  """Params and batch_stats (numpy) of a train-state item; skips opt_state."""
  state_dir = storage.path(state_dir)  # Absolute: orbax finds no metadata under a relative path.
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(state_dir).item_metadata.tree
  wanted = {k: tree[k] for k in COLLECTIONS if k in tree}
  target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), wanted)
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
  restored = checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(
      item=target, restore_args=restore_args, partial_restore=True))
  return {k: restored.get(k) or {} for k in COLLECTIONS}


def find_checkpoint(workdir: str, which: str = 'best') -> str:
  """The `state` item folder of the best (falls back to latest) or latest checkpoint."""
  if which not in ('best', 'latest'):
    raise ValueError(f"checkpoint={which!r} is not allowed: expected 'best' or 'latest'.")
  for kind in ((which, 'latest') if which == 'best' else (which,)):
    root = workdirs.Workdir(workdir).checkpoints(kind)
    steps = sorted((int(s) for s in storage.listdir(root) if s.isdigit()), reverse=True)
    if steps:
      return os.fspath(root / str(steps[0]) / 'state')
  raise FileNotFoundError(f'{workdir} holds no {which} checkpoint (checkpoints/{which}/<step>/); '
                          'train it first, or point at another workdir.')


def save_converted(variables: dict[str, Any], directory: storage.PathLike,
                   meta: dict[str, Any]) -> None:
  """Writes converted weights as `init_from` reads them: DIR/variables + DIR/weights.json."""
  directory = storage.path(directory)
  storage.makedirs(directory)
  with ocp.PyTreeCheckpointer() as checkpointer:
    checkpointer.save(directory / CONVERTED_ITEM,
                      {k: variables.get(k) or {} for k in COLLECTIONS}, force=True)
  storage.write_json(directory / CONVERTED_META, meta)


def read_variables(source: str, model_config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The {'params', 'batch_stats'} of any `init_from` source (see module docstring)."""
  root = storage.path(source)
  path = os.fspath(root)
  if storage.isdir(root / workdirs.CHECKPOINTS_DIR):
    return restore_checkpoint_variables(find_checkpoint(path, 'best'))
  if storage.isdir(root / CONVERTED_ITEM):
    return restore_checkpoint_variables(root / CONVERTED_ITEM)
  if storage.isdir(root / 'state'):
    return restore_checkpoint_variables(root / 'state')
  is_file = storage.isfile(root)
  if (is_file and path.endswith(('.h5', '.pth', '.pt', '.npz'))
      and model_config.name != 'vgg'):
    raise ValueError(
        f'config.init_from={source!r} is a weights file, which vgg_flax converts for '
        f"config.model.name='vgg' only; config.model.name={model_config.name!r} can start "
        'from a vgg_flax training workdir or checkpoint of the same model.')
  if is_file and path.endswith('.h5'):
    return keras_weights.from_keras(path, model_config.depth)
  if is_file and path.endswith(('.pth', '.pt', '.npz')):
    return weights.from_torchvision(path, model_config.depth, model_config.batch_norm)
  raise FileNotFoundError(
      f'config.init_from={source!r} is not a training workdir, a checkpoint step folder, a '
      'folder written by `python -m vgg_flax.convert`, or a .pth/.pt/.npz/.h5 weights file.')


def _compile(patterns, field: str) -> list[re.Pattern]:
  if isinstance(patterns, str):
    patterns = (patterns,)
  compiled = []
  for p in patterns:
    try:
      compiled.append(re.compile(p))
    except re.error as e:
      raise ValueError(f'config.{field} entry {p!r} is not a valid regex: {e}') from None
  return compiled


def _check_all_match(compiled: list[re.Pattern], paths, field: str) -> None:
  for pattern in compiled:
    if not any(pattern.search(p) for p in paths):
      layers = sorted({p.split('/')[0] for p in paths})
      raise ValueError(f'config.{field} entry {pattern.pattern!r} matches no parameter; '
                       f'paths look like "block1_conv1/kernel", layers: {", ".join(layers)}.')


def merge_variables(target: dict[str, Any], source: dict[str, Any], dont_load=(),
                    ) -> tuple[dict[str, Any], list[str]]:
  """Replaces target variables by the source ones, checking names and shapes.

  Args:
    target: {'params': ..., 'batch_stats': ...} of the fresh model.
    source: the same collections from the weights to load.
    dont_load: regexes over '/'-joined paths that keep the target's value.

  Returns:
    The merged collections (numpy for loaded leaves) and the loaded paths.

  Raises:
    ValueError: a loaded tensor of another shape, or model tensors the source
      lacks; both name the tensors and suggest `config.dont_load`.
  """
  skip = _compile(dont_load, 'dont_load')
  flat_target = {c: flatten(target.get(c) or {}) for c in COLLECTIONS}
  flat_source = {c: flatten(source.get(c) or {}) for c in COLLECTIONS}
  _check_all_match(skip, [p for c in COLLECTIONS for p in flat_target[c]], 'dont_load')
  merged, loaded, missing = {}, [], []
  for c in COLLECTIONS:
    merged[c] = dict(flat_target[c])
    for path, leaf in flat_target[c].items():
      if any(s.search(path) for s in skip):
        continue
      if path not in flat_source[c]:
        missing.append(path)
        continue
      value = np.asarray(flat_source[c][path])
      if value.shape != tuple(leaf.shape):
        layer = path.split('/')[0]
        raise ValueError(
            f'cannot load {path}: config.init_from has shape {value.shape}, the model '
            f'{tuple(leaf.shape)}. To keep it freshly initialised (a new number of classes, '
            f'another image size for fc1), add it to dont_load, e.g. '
            f'--config.dont_load=\'("{layer}",)\'.')
      merged[c][path] = value.astype(leaf.dtype)
      loaded.append(path)
  if missing:
    raise ValueError(f'config.init_from lacks {len(missing)} tensors of the model: '
                     f'{", ".join(missing[:8])}{", ..." if len(missing) > 8 else ""}; '
                     'add them to config.dont_load to keep them freshly initialised.')
  used = set(loaded)
  unused = sorted(p for c in COLLECTIONS for p in flat_source[c] if p not in used
                  and p not in merged[c])
  backbone = [p for p in unused if p.startswith('block')]
  if backbone:  # E.g. BN statistics into a model without BN: the model would be wrong.
    raise ValueError(f'config.init_from has backbone tensors the model does not use: '
                     f'{", ".join(backbone[:6])}; is config.model.batch_norm or depth different '
                     'from the source?')
  if unused:
    logging.info('init_from: not used by this model (another head): %s', ', '.join(unused))
  return {c: _unflatten_like(target.get(c) or {}, merged[c]) for c in COLLECTIONS}, loaded


def load_init(state, config: ml_collections.ConfigDict):
  """Returns `state` with its variables loaded from `config.init_from`.

  The optimiser state is kept (it does not depend on parameter values at
  step 0); loaded arrays take the shardings of the fresh ones.
  """
  source = read_variables(config.init_from, config.model)
  target = {'params': state.params, 'batch_stats': state.batch_stats}
  merged, loaded = merge_variables(target, source, config.dont_load)
  placed = jax.tree.map(lambda new, old: jax.device_put(new, old.sharding), merged, target)
  flat = flatten(merged['params'])
  loaded_params = sum(int(np.prod(flat[p].shape)) for p in loaded if p in flat)
  logging.info('init_from %s: loaded %d tensors (%s of %s parameters); kept fresh: %s.',
               config.init_from, len(loaded), f'{loaded_params:,}',
               f'{models.count_params(merged["params"]):,}',
               ', '.join(config.dont_load) or 'nothing')
  return state.replace(params=placed['params'], batch_stats=placed['batch_stats'])


def freeze_labels(params: Any, patterns) -> Any:
  """'frozen' for every parameter whose path matches a regex, else 'trainable'."""
  compiled = _compile(patterns, 'freeze')
  flat = flatten(params)
  _check_all_match(compiled, list(flat), 'freeze')
  labels = {p: FROZEN if any(r.search(p) for r in compiled) else TRAINABLE for p in flat}
  return _unflatten_like(params, labels)


def freeze(tx: optax.GradientTransformation, config: ml_collections.ConfigDict,
           ) -> optax.GradientTransformation:
  """`tx` for the trainable parameters, zero updates and no state for the frozen ones."""
  if not config.freeze:
    return tx
  return optax.multi_transform({TRAINABLE: tx, FROZEN: optax.set_to_zero()},
                               lambda params: freeze_labels(params, config.freeze))


# Net A's conv layers per block, in the order the paper initialises them.
_NET_A_SHARED = (1, 1, 2)  # Blocks 1-3: the first four conv layers; blocks 4-5 start fresh.


def net_a_dont_load(model_config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """`config.dont_load` that starts a deeper net from a trained net A (paper, 3.1).

  The paper initialises "the first four convolutional layers and the last three
  fully-connected layers with the layers of net A", the others randomly. A's
  layers keep their names in B-E (block1_conv1, block2_conv1, block3_conv1/2),
  so those load by name together with their BatchNorm and fc1, fc2,
  predictions; every other layer is listed here and keeps its fresh init.
  """
  cfg = models.CFGS[model_config.variant or models.DEPTH_TO_VARIANT[model_config.depth]]
  fresh = [f'^block{b}_(conv|bn){i}/'
           for b, (kernels, shared) in enumerate(zip(cfg, _NET_A_SHARED), 1)
           for i in range(shared + 1, len(kernels) + 1)]
  return tuple(fresh) + ('^block[45]_',)


def restore_model(workdir: str, config: ml_collections.ConfigDict, checkpoint: str = 'best'):
  """(model, variables, step) of a workdir's best (default) or latest checkpoint."""
  dataset = workdirs.Workdir(workdir).read_dataset()
  model = models.create_model(config.model, dataset['num_model_classes'])
  state_dir = find_checkpoint(workdir, checkpoint)
  variables = restore_checkpoint_variables(state_dir)
  step = int(os.path.basename(os.path.dirname(state_dir)))
  return model, variables, step
