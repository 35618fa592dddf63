"""Data sources and their checks: tfds builders, the built-in `digits`, image folders.

`get_builder` finds the prepared dataset a config names (never downloading)
and `dataset_info` checks it against the config. Every data problem raises
`DataError` naming the dataset, folder or field and what to do.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import difflib
import functools
import hashlib
import json
import os
import tempfile

from absl import logging
import ml_collections
import PIL.Image
from vgg_flax.runtime.quiet_tf import tf
import tensorflow_datasets as tfds

from vgg_flax.data import digits  # Also registers 'digits' with tfds.

BUILT_IN = ('digits', 'image_folder')
# What tfds.ImageFolder reads; other files in a class folder are ignored.
IMAGE_FOLDER_EXTENSIONS = ('.jpg', '.jpeg', '.png')


class DataError(ValueError):
  """A dataset is missing, unprepared, malformed or does not fit the config."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the model and the trainer need to know about the data."""
  name: str
  num_classes: int
  num_channels: int
  class_names: tuple[str, ...]
  train_split: str
  eval_split: str
  num_train_examples: int
  num_eval_examples: int


@functools.cache
def _keep_tf_off_accelerators() -> None:
  try:  # The accelerators belong to JAX; TF would grab all GPU memory.
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:  # TF already initialised its devices: too late to hide them.
    pass


def get_builder(config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """Returns the prepared builder for `config.dataset`; never downloads.

  Args:
    config: uses `dataset` ('digits', 'image_folder' or a registered tfds name)
      and `data_dir` (tfds data_dir or the image folder root; None = tfds default).

  Raises:
    DataError: unknown name, unprepared tfds dataset, or a malformed folder.
  """
  _keep_tf_off_accelerators()
  name, data_dir = config.dataset, config.data_dir
  if name == 'digits':  # Offline: the images ship with scikit-learn.
    return digits.prepare(data_dir)
  if name == 'image_folder':
    _check_image_folder(data_dir)
    return tfds.ImageFolder(_readable_image_root(data_dir, config.input.skip_corrupt))
  return _registered_builder(name, data_dir)


def _check_image_folder(root: str | None) -> None:
  layout = f'<root>/<split>/<class>/<image> ({", ".join(IMAGE_FOLDER_EXTENSIONS)})'
  if not root:
    raise DataError(f"config.dataset='image_folder' needs config.data_dir: the root of {layout}.")
  if not tf.io.gfile.isdir(root):
    raise DataError(f'image folder {root} (config.data_dir) does not exist; expected {layout}.')

  def subdirs(path):  # gfile, like ImageFolder, so gs:// roots work too.
    return [os.path.join(path, f.rstrip('/')) for f in sorted(tf.io.gfile.listdir(path))
            if tf.io.gfile.isdir(os.path.join(path, f))]

  splits = subdirs(root)
  if not splits:
    raise DataError(f'image folder {root} has no split folders (train/, test/, ...); '
                    f'expected {layout}.')
  for split in splits:
    if not subdirs(split):
      raise DataError(f'split folder {split} has no class folders; expected {layout}.')
  for folder in [c for split in splits for c in subdirs(split)]:
    if not any(f.lower().endswith(IMAGE_FOLDER_EXTENSIONS) for f in tf.io.gfile.listdir(folder)):
      raise DataError(f'class folder {folder} holds no images '
                      f'({", ".join(IMAGE_FOLDER_EXTENSIONS)}); add images or remove the folder.')


def _is_readable_image(path: str) -> bool:
  try:
    with tf.io.gfile.GFile(path, 'rb') as f, PIL.Image.open(f) as image:
      image.load()  # A full decode: verify() alone passes truncated JPEGs.
    return True
  except Exception:  # pylint: disable=broad-except  (PIL raises many kinds)
    return False


def cache_dir() -> str:
  """Where vgg_flax keeps what it learnt about local data between launches."""
  return os.environ.get('VGG_FLAX_CACHE_DIR') or os.path.join(
      os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache'), 'vgg_flax')


def _unreadable_images(root: str, files: list[str]) -> list[str]:
  """The files of `files` that do not decode, from the cache when the folder is unchanged.

  Decoding every image takes minutes on an ImageNet-sized folder, so the
  verdict is kept in `cache_dir()`, keyed by the folder and a fingerprint of
  its file names, sizes and modification times: any added, removed or
  rewritten file checks the folder again. (On object storage, where a stat
  per file costs a request, the fingerprint is the names only.)
  """
  def identity(path: str) -> str:
    if '://' in path:
      return path
    stat = os.stat(path)
    return f'{path}\t{stat.st_size}\t{stat.st_mtime_ns}'

  fingerprint = hashlib.sha256('\n'.join(map(identity, files)).encode()).hexdigest()
  cache = os.path.join(cache_dir(), 'image_folders',
                       hashlib.sha256(root.encode()).hexdigest()[:32] + '.json')
  try:
    with open(cache) as f:
      cached = json.load(f)
    if cached['fingerprint'] == fingerprint:
      return cached['unreadable']
  except (OSError, ValueError, KeyError, TypeError):
    pass  # No cache yet, or an unusable one: check the folder.
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    bad = [f for f, ok in zip(files, pool.map(_is_readable_image, files)) if not ok]
  try:  # Written whole, then renamed: a concurrent launch never reads half a file.
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    with tempfile.NamedTemporaryFile('w', dir=os.path.dirname(cache), delete=False) as f:
      json.dump({'root': root, 'files': len(files), 'fingerprint': fingerprint,
                 'unreadable': bad}, f)
    os.replace(f.name, cache)
  except OSError as e:
    logging.warning('Could not cache the image check of %s in %s (%s): the next launch '
                    'decodes every image again.', root, cache, e)
  return bad


def _readable_image_root(root: str, skip_corrupt: bool) -> str:
  """Checks every image of an image folder before training; returns the root to read.

  A file that does not decode (truncated, not an image) fails here with its
  name, instead of deep inside tf.data. With `skip_corrupt`, the good files
  are linked into a temporary mirror of the folder (the user's folder is not
  touched) and the skipped ones are counted in the log. The files are decoded
  once: the verdict is cached for later launches (`_unreadable_images`).
  """
  files = sorted(os.path.join(d, f) for d, _, names in tf.io.gfile.walk(root) for f in names
                 if f.lower().endswith(IMAGE_FOLDER_EXTENSIONS))
  bad = _unreadable_images(root, files)
  if not bad:
    return root
  if not skip_corrupt:
    shown = ', '.join(bad[:5]) + (f' and {len(bad) - 5} more' if len(bad) > 5 else '')
    raise DataError(f'{len(bad)} of {len(files)} files in image folder {root} are not readable '
                    f'images: {shown}. Remove them, or set config.input.skip_corrupt=True to '
                    'skip them.')
  if '://' in root:
    raise DataError(f'config.input.skip_corrupt needs a local image folder, not {root}.')
  mirror = tempfile.mkdtemp(prefix='vgg_flax_images_')
  for f in set(files) - set(bad):
    link = os.path.join(mirror, os.path.relpath(f, root))
    os.makedirs(os.path.dirname(link), exist_ok=True)
    os.symlink(os.path.abspath(f), link)
  logging.warning('Skipping %d unreadable files of %d in %s (config.input.skip_corrupt): %s',
                  len(bad), len(files), root, ', '.join(bad[:5]))
  return mirror


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
  try:  # ImageFolder reads whole split folders; tfds builders also take 'train[:90%]'.
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
                 builder: tfds.core.DatasetBuilder | None = None) -> DatasetInfo:
  """Returns the dataset facts the run needs, checked against the config.

  Args:
    config: uses `dataset`, `data_dir`, `train_split`, `eval_split` ('' =
      'validation' when the dataset has it, else 'test') and `input.mean`.
    builder: from `get_builder(config)`; built when not given.

  Raises:
    DataError: unknown split, no image/label features, or `input.mean` of the
      wrong length.
  """
  builder = builder or get_builder(config)
  image_key, label_key = feature_keys(builder)
  features = builder.info.features
  num_channels = features[image_key].shape[-1]
  if num_channels is None:
    raise DataError(f'dataset {config.dataset} has images with an unknown number of channels.')
  eval_split = config.eval_split or (
      'validation' if 'validation' in builder.info.splits else 'test')
  if config.input.normalization != 'none' and len(config.input.mean) != num_channels:
    raise DataError(
        f'dataset {config.dataset} has {num_channels} channel(s), config.input.mean has '
        f'{len(config.input.mean)} values; set input.mean and input.std to {num_channels} '
        "values, or input.normalization='none'.")
  return DatasetInfo(
      config.dataset, features[label_key].num_classes, num_channels,
      tuple(features[label_key].names), config.train_split, eval_split,
      num_examples(builder, config.train_split, 'train_split'),
      num_examples(builder, eval_split, 'eval_split'))
