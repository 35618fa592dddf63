"""Data sources and their checks: tfds builders, the built-in `digits`, normalisation constants.

`tfds_builder` finds the prepared dataset a config names (never downloading)
and `dataset_info` checks it against the config and settles the normalisation
constants. Image folders are in `image_folders`; `input_pipeline.get_builder`
picks between the two. Every data problem raises `DataError` naming the
dataset, folder or field and what to do.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import hashlib
import json
import os
import tempfile
from typing import Any, Callable

from absl import logging
import ml_collections
import numpy as np
from vgg_flax.runtime.quiet_tf import graph_fn, tf
import tensorflow_datasets as tfds

from vgg_flax.data import digits  # Also registers 'digits' with tfds.

BUILT_IN = ('digits', 'image_folder')
# Images of the training split that `measure_constants` reads: its mean and
# std are then known to about 1% (the split's file order is already shuffled).
MEASURED_IMAGES = 1024


class DataError(ValueError):
  """A dataset is missing, unprepared, malformed or does not fit the config."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the model and the trainer need to know about the data.

  `mean` and `std` are the normalisation constants of the run (see
  `dataset_info`); `eval_files_sha256` identifies the evaluation files of an
  image folder (names only), '' for other datasets. The trainer records all of
  it in WORKDIR/dataset.json.
  """
  name: str
  num_classes: int
  num_channels: int
  class_names: tuple[str, ...]
  train_split: str
  eval_split: str
  num_train_examples: int
  num_eval_examples: int
  mean: tuple[float, ...] = ()
  std: tuple[float, ...] = ()
  eval_files_sha256: str = ''


@functools.cache
def keep_tf_off_accelerators() -> None:
  try:  # The accelerators belong to JAX; TF would grab all GPU memory.
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:  # TF already initialised its devices: too late to hide them.
    pass


def cache_dir() -> str:
  """Where vgg_flax keeps what it learnt about local data between launches."""
  return os.environ.get('VGG_FLAX_CACHE_DIR') or os.path.join(
      os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache'), 'vgg_flax')


def cached_json(kind: str, name: str, fingerprint: str, compute: Callable[[], Any]) -> Any:
  """`compute()`, kept in `cache_dir()/kind/` under `name` while `fingerprint` is unchanged.

  One file per name: a new fingerprint (the data changed) replaces the old
  verdict. Written whole, then renamed: a concurrent launch never reads half a
  file. A cache that cannot be written costs the next launch a recomputation.
  """
  path = os.path.join(cache_dir(), kind, hashlib.sha256(name.encode()).hexdigest()[:32] + '.json')
  try:
    with open(path) as f:
      cached = json.load(f)
    if cached['fingerprint'] == fingerprint:
      return cached['value']
  except (OSError, ValueError, KeyError, TypeError):
    pass  # No cache yet, or an unusable one.
  value = compute()
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tempfile.NamedTemporaryFile('w', dir=os.path.dirname(path), delete=False) as f:
      json.dump({'name': name, 'fingerprint': fingerprint, 'value': value}, f)
    os.replace(f.name, path)
  except OSError as e:
    logging.warning('Could not cache %s of %s in %s (%s): the next launch computes it again.',
                    kind, name, path, e)
  return value


def tfds_builder(config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """Returns the prepared builder of a tfds dataset or `digits`; never downloads.

  Args:
    config: uses `dataset` ('digits' or a registered tfds name) and `data_dir`
      (tfds data_dir; None = tfds default).

  Raises:
    DataError: unknown name or unprepared tfds dataset.
  """
  keep_tf_off_accelerators()
  name, data_dir = config.dataset, config.data_dir
  if name == 'digits':  # Offline: the images ship with scikit-learn.
    return digits.prepare(data_dir)
  return _registered_builder(name, data_dir)


def _registered_builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
  try:
    dataset_name, _ = tfds.core.naming.parse_builder_name_kwargs(name)
  except ValueError as e:
    raise DataError(f'config.dataset={name!r} is not a valid tfds name: {e}') from None
  if dataset_name.namespace:  # Community datasets are resolved over the network.
    raise DataError(f'config.dataset={name!r}: namespaced tfds datasets are not supported '
                    'offline; use a registered name, digits or image_folder.')
  try:
    builder = tfds.builder(name, data_dir=data_dir, try_gcs=False)
  except tfds.core.registered.DatasetNotFoundError:
    close = difflib.get_close_matches(
        dataset_name.name, tfds.list_builders(with_community_datasets=False), n=5)
    raise DataError(
        f'unknown dataset {name!r} (config.dataset). Close registered tfds names: '
        f'{close or "none"}; built in: {", ".join(BUILT_IN)}.') from None
  except ValueError as e:  # E.g. an unknown builder config or version.
    raise DataError(f'config.dataset={name!r}: {e}') from None
  if builder.is_prepared():
    return builder
  root = data_dir or '~/tensorflow_datasets (or $TFDS_DATA_DIR)'
  if manual := getattr(builder, 'MANUAL_DOWNLOAD_INSTRUCTIONS', None):
    how = (f'{builder.name} needs a manual download: put its files in {root}/downloads/manual '
           f'({" ".join(manual.split())[:240]}...), then run '
           f'`tfds build {name} --data_dir={root}`.')
  else:
    how = (f'On a machine with internet run `tfds build {name} --data_dir=DIR`, copy DIR here '
           'and set config.data_dir=DIR.')
  raise DataError(f'dataset {name!r} is not prepared: no dataset_info.json in {builder.data_dir} '
                  f'(config.data_dir={data_dir!r}); vgg_flax never downloads. {how}')


def feature_keys(builder: tfds.core.DatasetBuilder) -> tuple[str, str]:
  """The (image, label) feature names of `builder`: its supervised keys, else the usual ones."""
  keys, features = builder.info.supervised_keys, builder.info.features
  if not (isinstance(keys, tuple) and len(keys) == 2 and all(isinstance(k, str) for k in keys)):
    keys = ('image', 'label')
  image, label = (features[k] if k in features else None for k in keys)
  if not (isinstance(image, tfds.features.Image) and isinstance(label, tfds.features.ClassLabel)):
    raise DataError(f'dataset {builder.name} has no (Image, ClassLabel) feature pair '
                    f'{keys}; vgg_flax needs an image classification dataset.')
  return keys


def num_examples(builder: tfds.core.DatasetBuilder, split: str, field: str) -> int:
  """Examples in `split` (a config field, named by `field` in errors); never 0."""
  available = sorted(builder.info.splits.keys())
  try:  # Image folders read whole splits; tfds builders also take 'train[:90%]'.
    if isinstance(builder, tfds.ImageFolder) and split not in available:
      raise KeyError(split)
    n = builder.info.splits[split].num_examples
  except (KeyError, ValueError, AssertionError):
    raise DataError(f'config.{field}={split!r} is not a split of dataset {builder.name}; '
                    f'available: {available}.') from None
  if n <= 0:
    raise DataError(f'split {split!r} of dataset {builder.name} (config.{field}) is empty.')
  return n


def dataset_info(config: ml_collections.ConfigDict,
                 builder: tfds.core.DatasetBuilder) -> DatasetInfo:
  """Returns the dataset facts the run needs, checked against the config.

  The normalisation constants are `config.input.mean` and `std` when they have
  one value per channel of the images; otherwise (say the default config's
  one-channel digits constants on an RGB folder) they are measured on the
  training split (`measure_constants`, cached). A one-channel constant is
  never broadcast over three channels.

  Args:
    config: uses `dataset`, `train_split`, `eval_split` ('' = 'validation' when
      the dataset has it, else 'test') and `input.*`.
    builder: from `input_pipeline.get_builder(config)`.

  Raises:
    DataError: unknown split, or no image/label features.
  """
  image_key, label_key = feature_keys(builder)
  features = builder.info.features
  num_channels = features[image_key].shape[-1]
  if num_channels is None:
    raise DataError(f'dataset {config.dataset} has images with an unknown number of channels.')
  eval_split = config.eval_split or (
      'validation' if 'validation' in builder.info.splits else 'test')
  n_train = num_examples(builder, config.train_split, 'train_split')
  n_eval = num_examples(builder, eval_split, 'eval_split')
  mean, std = tuple(config.input.mean), tuple(config.input.std)
  if _constants_needed(config) and len(mean) != num_channels:
    mean, std = measure_constants(builder, config.train_split, num_channels)
    logging.info('Normalising with the mean %s and std %s of the %s split (config.input.mean '
                 'has %d value(s), the images %d channel(s)).', mean, std, config.train_split,
                 len(config.input.mean), num_channels)
  # An image folder names its files (image_folders.ImageFiles): the run records them.
  names_sha256 = getattr(builder, 'names_sha256', None)
  return DatasetInfo(
      config.dataset, features[label_key].num_classes, num_channels,
      tuple(features[label_key].names), config.train_split, eval_split, n_train, n_eval,
      mean, std, names_sha256(eval_split) if names_sha256 else '')


def _constants_needed(config: ml_collections.ConfigDict) -> bool:
  return config.input.normalization != 'none' and not config.input.get('preset', '')


def measure_constants(builder: tfds.core.DatasetBuilder, split: str, num_channels: int
                      ) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-channel mean and std (0-255 scale) of the pixels of `split`'s first images.

  Reads the first `MEASURED_IMAGES` images in the split's fixed order, once:
  the result is cached, keyed by what identifies the split (an image folder's
  file names, sizes and times; a tfds dataset's name, version, folder and
  size). A std below 1 (near-constant images) is taken as 1.
  """
  n = builder.info.splits[split].num_examples if split in builder.info.splits else -1
  key = getattr(builder, 'cache_key', None)  # Image folders: their files (image_folders).
  fingerprint = key(split) if key else f'{builder.info.full_name}|{builder.data_dir}|{split}|{n}'

  def measure():
    image_key = feature_keys(builder)[0]
    ds = builder.as_dataset(split=split, shuffle_files=False,
                            read_config=tfds.ReadConfig(try_autocache=False))

    def moments(example):  # Per image: pixel count, per-channel sums of x and x^2.
      image = example[image_key]
      # Exact for uint8: int32 sums along rows (under 2**31 up to 33,000 px wide).
      x = tf.cast(image, tf.int32 if image.dtype == tf.uint8 else tf.float64)
      rows, rows2 = tf.reduce_sum(x, 1), tf.reduce_sum(x * x, 1)  # (H, C)
      return (tf.cast(tf.shape(x)[0] * tf.shape(x)[1], tf.float64),
              tf.reduce_sum(tf.cast(rows, tf.float64), 0),
              tf.reduce_sum(tf.cast(rows2, tf.float64), 0))

    # Few in parallel: a photo of 12 Mpx is 144 MB as int32.
    ds = ds.take(MEASURED_IMAGES).map(graph_fn(moments), num_parallel_calls=4,
                                      deterministic=True)
    count, total, squares = 0.0, np.zeros(num_channels), np.zeros(num_channels)
    for c, s, q in ds.as_numpy_iterator():
      count, total, squares = count + c, total + s, squares + q
    mean = total / max(count, 1.0)
    std = np.sqrt(np.maximum(squares / max(count, 1.0) - mean**2, 0.0))
    return {'mean': [round(float(v), 3) for v in mean],
            'std': [round(float(max(v, 1.0)), 3) for v in std]}

  value = cached_json('constants', f'{builder.data_dir}|{split}', fingerprint, measure)
  return tuple(value['mean']), tuple(value['std'])


def with_constants(config: ml_collections.ConfigDict, mean, std) -> ml_collections.ConfigDict:
  """`config`, or a copy of it normalising with `mean` and `std` when those differ.

  Empty constants leave `config` as it is: a run's dataset.json from before
  they were recorded (its config's constants were the run's).
  """
  if not mean or (tuple(config.input.mean), tuple(config.input.std)) == (tuple(mean), tuple(std)):
    return config
  config = copy.deepcopy(config)
  config.input.mean, config.input.std = tuple(mean), tuple(std)
  return config
