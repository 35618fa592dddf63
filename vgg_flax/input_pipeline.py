"""Input pipelines: tfds datasets, the built-in `digits`, and image folders.

Every data problem raises `DataError` naming the dataset, folder or field and
what to do; nothing here ever reaches for the network. Training batches are a
deterministic function of (config.seed, step), so a resumed run sees exactly
the batches a run without interruption would have seen.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import difflib
import functools
import math
import os
import tempfile
from typing import Iterator

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import PIL.Image
import tensorflow as tf
import tensorflow_datasets as tfds

from vgg_flax import datasets as vgg_datasets  # Registers 'digits' with tfds.

BUILT_IN = ('digits', 'image_folder')
# What tfds.ImageFolder reads; other files in a class folder are ignored.
IMAGE_FOLDER_EXTENSIONS = ('.jpg', '.jpeg', '.png')
Batch = dict[str, np.ndarray]


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
  if name == 'digits':
    builder = vgg_datasets.Digits(data_dir=data_dir)
    if not builder.is_prepared():  # Offline: the images ship with scikit-learn.
      # One writer: on several hosts sharing a data_dir, concurrent builds collide.
      if jax.process_index() == 0:
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(try_download_gcs=False))
      if jax.process_count() > 1:
        multihost_utils.sync_global_devices('vgg_flax: digits prepared')
        builder = vgg_datasets.Digits(data_dir=data_dir)
    return builder
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


def _readable_image_root(root: str, skip_corrupt: bool) -> str:
  """Checks every image of an image folder before training; returns the root to read.

  A file that does not decode (truncated, not an image) fails here with its
  name, instead of deep inside tf.data. With `skip_corrupt`, the good files
  are linked into a temporary mirror of the folder (the user's folder is not
  touched) and the skipped ones are counted in the log.
  """
  files = sorted(os.path.join(d, f) for d, _, names in tf.io.gfile.walk(root) for f in names
                 if f.lower().endswith(IMAGE_FOLDER_EXTENSIONS))
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    bad = [f for f, ok in zip(files, pool.map(_is_readable_image, files)) if not ok]
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


def _feature_keys(builder: tfds.core.DatasetBuilder) -> tuple[str, str]:
  keys, features = builder.info.supervised_keys, builder.info.features
  if not (isinstance(keys, tuple) and len(keys) == 2 and all(isinstance(k, str) for k in keys)):
    keys = ('image', 'label')
  image, label = (features[k] if k in features else None for k in keys)
  if not (isinstance(image, tfds.features.Image) and isinstance(label, tfds.features.ClassLabel)):
    raise DataError(f'dataset {builder.name} has no (Image, ClassLabel) feature pair '
                    f'{keys}; vgg_flax needs an image classification dataset.')
  return keys


def _num_examples(builder: tfds.core.DatasetBuilder, split: str, field: str) -> int:
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
  image_key, label_key = _feature_keys(builder)
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
      _num_examples(builder, config.train_split, 'train_split'),
      _num_examples(builder, eval_split, 'eval_split'))


# The preprocessing imported weights were trained with (config.input.preset).
TORCHVISION_MEAN, TORCHVISION_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # RGB, 0-1.
CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)  # keras.applications.vgg16.preprocess_input.


def normalize(image: tf.Tensor, config: ml_collections.ConfigDict) -> tf.Tensor:
  """Casts to float32 and applies `config.input.preset`, else `input.normalization`.

  Presets: 'torchvision' scales RGB to 0-1, then (x - mean) / std; 'caffe'
  reverses RGB to BGR and subtracts the BGR means on the 0-255 scale.
  """
  image = tf.cast(image, tf.float32)
  preset = config.input.get('preset', '')
  if preset:
    if image.shape[-1] not in (None, 3):  # None: a crop lost the static shape.
      raise DataError(f'config.input.preset={preset!r} needs RGB images; these have '
                      f'{image.shape[-1]} channel(s).')
    if preset == 'torchvision':
      return (image / 255.0 - tf.constant(TORCHVISION_MEAN)) / tf.constant(TORCHVISION_STD)
    if preset == 'caffe':
      return image[..., ::-1] - tf.constant(CAFFE_BGR_MEAN)
    raise ValueError(f"config.input.preset={preset!r} is not allowed: expected one of "
                     "'', 'torchvision', 'caffe'.")
  if config.input.normalization == 'none':
    return image
  image -= tf.constant(config.input.mean, tf.float32)
  if config.input.normalization == 'mean_std':
    image /= tf.constant(config.input.std, tf.float32)
  return image


def _resize_smaller_side(image: tf.Tensor, side) -> tf.Tensor:
  """Isotropic resize (float32 out) so that min(height, width) == side."""
  hw = tf.cast(tf.shape(image)[:2], tf.float32)
  side = tf.cast(side, tf.float32)
  new_hw = tf.cast(tf.round(hw * side / tf.reduce_min(hw)), tf.int32)
  new_hw = tf.maximum(new_hw, tf.cast(side, tf.int32))  # Rounding must not undershoot.
  return _resize(image, new_hw)


def _resize(image: tf.Tensor, hw) -> tf.Tensor:
  """Bilinear resize to float32, antialiased only when shrinking."""
  # Antialiasing does nothing when enlarging but costs 3x there (256 -> 512 px).
  shrinking = tf.reduce_any(tf.convert_to_tensor(hw) < tf.shape(image)[:2])
  return tf.cond(shrinking, lambda: tf.image.resize(image, hw, antialias=True),
                 lambda: tf.image.resize(image, hw))


def _center_crop(image: tf.Tensor, size: int) -> tf.Tensor:
  hw = tf.shape(image)[:2]
  return tf.image.crop_to_bounding_box(image, (hw[0] - size) // 2, (hw[1] - size) // 2, size, size)


def preprocess_for_eval(image: tf.Tensor, config: ml_collections.ConfigDict,
                        scale: int | None = None) -> tf.Tensor:
  """Resizes the smaller side to Q (`scale`, default `input.eval_resize`), centre-crops, normalizes."""
  image = _resize_smaller_side(image, scale or config.input.eval_resize)
  return normalize(_center_crop(image, config.image_size), config)


def preprocess_for_train(image: tf.Tensor, seed: tf.Tensor,
                         config: ml_collections.ConfigDict) -> tf.Tensor:
  """Augments a decoded uint8 HxWxC image (static C) to a normalized float32 crop.

  Args:
    image: decoded uint8 image, HxWxC.
    seed: shape [2] int32 seed: the only randomness (TF's stateless ops).
    config: uses `image_size` and `input.*`.
  """
  size, cfg = config.image_size, config.input
  scale_seed, crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
  if cfg.train_crop == 'scale_jitter':  # The paper: smaller side S ~ U{scale_min..scale_max}.
    side = tf.random.stateless_uniform(
        [], scale_seed, minval=cfg.scale_min, maxval=cfg.scale_max + 1, dtype=tf.int32)
    image = _resize_smaller_side(image, side)
    image = tf.image.stateless_random_crop(image, [size, size, image.shape[-1]], crop_seed)
  elif cfg.train_crop == 'random_resized':  # Inception-style area and aspect jitter.
    begin, crop, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image), bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        seed=crop_seed, min_object_covered=cfg.area_min, aspect_ratio_range=(3 / 4, 4 / 3),
        area_range=(cfg.area_min, 1.0), max_attempts=10, use_image_if_no_bounding_boxes=True)
    image = _resize(tf.slice(image, begin, crop), [size, size])
  elif cfg.train_crop == 'center':
    image = _center_crop(_resize_smaller_side(image, cfg.eval_resize), size)
  else:
    raise ValueError(f'config.input.train_crop={cfg.train_crop!r} is not allowed.')
  if cfg.flip:
    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
  return normalize(image, config)


def _process(index: int | None, count: int | None) -> tuple[int, int]:
  index = jax.process_index() if index is None else index
  count = jax.process_count() if count is None else count
  if not 0 <= index < count:
    raise ValueError(f'process_index={index} must be in [0, process_count={count}).')
  return index, count


def _local_batch(batch_size: int, process_count: int, field: str) -> int:
  if batch_size % process_count:
    raise DataError(f'config.{field}={batch_size} is not divisible by the process count '
                    f'({process_count}): every process loads {field} // process_count examples.')
  return batch_size // process_count


def steps_per_epoch(config: ml_collections.ConfigDict, info: DatasetInfo,
                    process_count: int | None = None) -> int:
  """Global batches per epoch (the same on every process).

  'global' order: examples // batch_size. 'per_process': every process reads
  its own slice, so (examples // processes) // local batch.
  """
  count = jax.process_count() if process_count is None else process_count
  local_batch = _local_batch(config.batch_size, count, 'batch_size')
  if config.input.order == 'global':
    steps = info.num_train_examples // config.batch_size
  else:
    steps = (info.num_train_examples // count) // local_batch
  if steps == 0:
    raise DataError(f'split {info.train_split!r} of {info.name} has {info.num_train_examples} '
                    f'examples, fewer than one batch (config.batch_size={config.batch_size}).')
  return steps


def _read(builder, split: str, index: int, count: int, *, drop_remainder: bool,
          shuffle_seed: int | None = None) -> tf.data.Dataset:
  """This process's slice of `split` as (encoded image, int32 label) pairs."""
  image_key, label_key = _feature_keys(builder)
  decoders = {image_key: tfds.decode.SkipDecoding()}  # Decode late, after skip.
  if isinstance(builder, tfds.ImageFolder):
    # ImageFolder has no subsplit API and shuffles files without a seed: slice
    # its fixed file order by hand, with the same arithmetic as tfds.even_splits.
    ds = builder.as_dataset(split=split, decoders=decoders, shuffle_files=False)
    n = builder.info.splits[split].num_examples
    per, extra = divmod(n, count)
    start = index * per + (0 if drop_remainder else min(index, extra))
    ds = ds.skip(start).take(per + (0 if drop_remainder or index >= extra else 1))
  else:
    ds = builder.as_dataset(
        split=tfds.even_splits(split, n=count, drop_remainder=drop_remainder)[index],
        decoders=decoders, shuffle_files=shuffle_seed is not None,
        read_config=tfds.ReadConfig(shuffle_seed=shuffle_seed, try_autocache=False))
  return ds.map(lambda ex: (ex[image_key], tf.cast(ex[label_key], tf.int32)))


def _seeds(*entropy: int) -> tuple[int, int, tuple[int, int]]:
  """File-order seed, shuffle seed and stateless augmentation key."""
  s = np.random.SeedSequence(list(entropy)).generate_state(4, dtype=np.uint32)
  return int(s[0]), int(s[1]), (int(s[2] >> 1), int(s[3] >> 1))  # int32-safe key.


def train_batches(config: ml_collections.ConfigDict, builder: tfds.core.DatasetBuilder,
                  info: DatasetInfo, *, start_step: int = 0, process_index: int | None = None,
                  process_count: int | None = None) -> Iterator[Batch]:
  """Endless training batches; batch k depends only on (config.seed, k).

  Each epoch is its own tf.data pipeline, seeded by (seed, epoch): file order,
  example shuffle, and per-example augmentation keys folded with the example's
  index in the epoch. Resuming at `start_step` therefore skips encoded
  examples of that epoch without decoding or augmenting them.

  With `input.order='global'` (the default) every process reads the same
  shuffled stream and keeps its rows of each global batch, so the global batch
  k is the same on 1 or N processes (each process reads, but does not decode,
  the others' examples). 'per_process' reads a disjoint slice per process
  (seeded by the process index too): less reading on large pods, but the
  batches then depend on the process count.

  Args:
    config: uses `seed`, `batch_size`, `image_size`, `input.*`.
    builder, info: from `get_builder(config)` and `dataset_info(config, builder)`.
    start_step: index of the first batch to yield.
    process_index, process_count: default jax.process_index(), process_count().

  Yields:
    {'image': float32 (local_batch, S, S, C), 'label': int32 (local_batch,)},
    local_batch = batch_size // process_count.
  """
  index, count = _process(process_index, process_count)
  local_batch = _local_batch(config.batch_size, count, 'batch_size')
  steps = steps_per_epoch(config, info, count)
  epoch, skip_batches = divmod(start_step, steps)
  global_order = config.input.order == 'global'
  # What this process reads and how it seeds: the whole split, process-free, in
  # 'global' order; its own slice, seeded by its index too, in 'per_process'.
  read_index, read_count = (0, 1) if global_order else (index, count)
  stream_batch = config.batch_size if global_order else local_batch
  decode = builder.info.features[_feature_keys(builder)[0]].decode_example
  cached = None
  while True:
    file_seed, shuffle_seed, aug_key = _seeds(config.seed, read_index, epoch)
    if not config.input.cache:
      examples = _read(builder, info.train_split, read_index, read_count, drop_remainder=True,
                       shuffle_seed=file_seed)
    else:
      # One in-memory copy of the encoded examples, read in a fixed file order
      # (a per-epoch order would tie a resumed run's order to its start epoch).
      if cached is None:
        cached = _read(builder, info.train_split, read_index, read_count,
                       drop_remainder=True).cache()
      examples = cached
    aug_key_t = tf.constant(aug_key, tf.int32)

    def prepare(i, example, aug_key_t=aug_key_t):
      image, label = example
      seed = tf.random.experimental.stateless_fold_in(aug_key_t, tf.cast(i, tf.int32))
      return {'image': preprocess_for_train(decode(image), seed, config), 'label': label}

    ds = examples.shuffle(config.input.shuffle_buffer, seed=shuffle_seed).enumerate()
    # Whole batches only, so that every process yields `steps` batches.
    ds = ds.take(steps * stream_batch).skip(skip_batches * stream_batch)
    if global_order and count > 1:  # Keep this process's rows of each global batch.
      ds = ds.filter(lambda i, _: (i % stream_batch) // local_batch == index)
    ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(local_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    yield from ds.as_numpy_iterator()
    epoch, skip_batches = epoch + 1, 0


def eval_batches(config: ml_collections.ConfigDict, builder: tfds.core.DatasetBuilder,
                 info: DatasetInfo, split: str | None = None, *,
                 process_index: int | None = None,
                 process_count: int | None = None) -> Iterator[Batch]:
  """One pass over `split`: every example exactly once across processes.

  Every process yields the same number of batches of the same size (the
  compiled eval step runs in lockstep); padding examples have mask 0.

  Args:
    config: uses `eval_batch_size` (0 = `batch_size`), `image_size`, `input.*`.
    builder, info: from `get_builder(config)` and `dataset_info(config, builder)`.
    split: default `info.eval_split`.
    process_index, process_count: default jax.process_index(), process_count().

  Yields:
    {'image': float32 (local_batch, S, S, C), 'label': int32 (local_batch,),
     'mask': float32 (local_batch,)}.
  """
  index, count = _process(process_index, process_count)
  field = 'eval_batch_size' if config.eval_batch_size else 'batch_size'
  local_batch = _local_batch(config.eval_batch_size or config.batch_size, count, field)
  split = split or info.eval_split
  n = info.num_eval_examples if split == info.eval_split else _num_examples(builder, split, 'split')
  # The largest process slice has ceil(n / count) examples, whatever the scheme.
  num_batches = math.ceil(math.ceil(n / count) / local_batch)
  decode = builder.info.features[_feature_keys(builder)[0]].decode_example

  def prepare(image, label):
    return {'image': preprocess_for_eval(decode(image), config), 'label': label,
            'mask': tf.constant(1.0, tf.float32)}

  ds = _read(builder, split, index, count, drop_remainder=False)
  ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(local_batch).prefetch(tf.data.AUTOTUNE)
  shape = (local_batch, config.image_size, config.image_size, info.num_channels)
  done = 0
  for batch in ds.as_numpy_iterator():
    yield _pad(batch, local_batch)
    done += 1
  for _ in range(done, num_batches):  # This process's slice ran out first.
    yield {'image': np.zeros(shape, np.float32), 'label': np.zeros(local_batch, np.int32),
           'mask': np.zeros(local_batch, np.float32)}


def _pad(batch: Batch, size: int) -> Batch:
  """Zero-pads a short (last) batch to `size` rows; the padding rows have mask 0."""
  missing = size - len(batch['mask'])
  if not missing:
    return batch
  return {k: np.concatenate([v, np.zeros((missing,) + v.shape[1:], v.dtype)])
          for k, v in batch.items()}


# The paper's test protocol (section 3.2). VGG halves the image five times: a
# map of side H gives H // 32 feature pixels, whatever the remainder.
TOTAL_STRIDE = 32
PROTOCOL_VIEWS = ('center', 'dense', 'multicrop')


def crop_offsets(length, size: int, grid: int) -> tf.Tensor:
  """Starts of `grid` crops of `size` evenly spaced over [0, length - size].

  round(np.linspace(0, length - size, grid)), so the first and last crops
  touch the borders; a grid of 1 is the centre crop of `preprocess_for_eval`.

  Returns:
    int32 tensor of shape (grid,).
  """
  slack = tf.convert_to_tensor(length, tf.int32) - size
  if grid == 1:
    return tf.reshape(slack // 2, [1])
  return tf.cast(tf.round(tf.linspace(0.0, tf.cast(slack, tf.float32), grid)), tf.int32)


def multicrop_images(image: tf.Tensor, config: ml_collections.ConfigDict,
                     scale: int) -> tf.Tensor:
  """The multi-crop views of one image: a regular grid of `image_size` crops at Q.

  Args:
    image: decoded uint8 HxWxC image.
    config: uses `image_size`, `eval.grid` and `input.*` (normalization).
    scale: Q, the smaller side after the isotropic resize.

  Returns:
    float32 (grid * grid, S, S, C), rows of crops top to bottom, each left to right.
  """
  size, grid = config.image_size, config.eval.grid
  image = normalize(_resize_smaller_side(image, scale), config)  # Once, not per crop.
  hw = tf.shape(image)[:2]
  rows = crop_offsets(hw[0], size, grid)[:, None] + tf.range(size)  # (grid, S) pixel rows.
  cols = crop_offsets(hw[1], size, grid)[:, None] + tf.range(size)
  crops = tf.gather(tf.gather(image, rows, axis=0), cols, axis=2)  # (grid, S, grid, S, C)
  crops = tf.transpose(crops, [0, 2, 1, 3, 4])
  return tf.reshape(crops, [grid * grid, size, size, image.shape[-1] or -1])


def dense_image(image: tf.Tensor, config: ml_collections.ConfigDict, scale: int) -> tf.Tensor:
  """The whole image for dense evaluation: smaller side Q, cropped to the network's stride.

  Both sides are centre-cropped down to a multiple of TOTAL_STRIDE: the
  poolings would drop the remainder from the bottom and right edges anyway,
  and a few shapes (rather than one per image size) keep batches large and
  compilations few. Q >= image_size keeps at least the training map.

  Returns:
    float32 (H, W, C), H and W multiples of TOTAL_STRIDE, min(H, W) == Q // 32 * 32.
  """
  image = _resize_smaller_side(image, scale)
  hw = tf.shape(image)[:2]
  keep = hw // TOTAL_STRIDE * TOTAL_STRIDE
  image = tf.image.crop_to_bounding_box(image, (hw[0] - keep[0]) // 2, (hw[1] - keep[1]) // 2,
                                        keep[0], keep[1])
  return normalize(image, config)


def protocol_batches(config: ml_collections.ConfigDict, builder: tfds.core.DatasetBuilder,
                     split: str, view: str, scale: int) -> Iterator[Batch]:
  """One pass over `split` for the test protocol: the views of every example at Q.

  Each row carries the index of its example in the split, so that the
  posteriors of several views, scales and modes can be averaged per example.
  Mirrored views are not made here: the evaluator mirrors on the device.
  Reads the whole split on this process (the protocol runs on one process).

  Args:
    config: uses `eval_batch_size` (0 = `batch_size`), `image_size`,
      `eval.grid` and `input.*`.
    builder: from `get_builder(config)`.
    split: the split to read.
    view: 'center' (`preprocess_for_eval` at Q), 'multicrop' (`eval.grid`**2
      crops per example, consecutive rows) or 'dense' (`dense_image`: whole
      images; a batch holds images of one shape only, so that each distinct
      shape compiles once).
    scale: Q, the smaller side of the resized image.

  Yields:
    {'image': float32 (batch, H, W, C), 'label': int32 (batch,), 'index': int64
    (batch,), 'mask': float32 (batch,)}, batch = eval_batch_size; H = W =
    image_size except for 'dense'. The last batch of a shape is zero-padded
    with mask 0.
  """
  if view not in PROTOCOL_VIEWS:
    raise ValueError(f'view={view!r} is not allowed: expected one of '
                     + ', '.join(map(repr, PROTOCOL_VIEWS)))
  batch_size = config.eval_batch_size or config.batch_size
  decode = builder.info.features[_feature_keys(builder)[0]].decode_example

  def prepare(index, example):
    image, label = decode(example[0]), example[1]
    if view == 'center':
      images = preprocess_for_eval(image, config, scale)[None]
    elif view == 'multicrop':
      images = multicrop_images(image, config, scale)
    else:
      images = dense_image(image, config, scale)[None]
    n = tf.shape(images)[0]
    return {'image': images, 'label': tf.fill([n], label), 'index': tf.fill([n], index),
            'mask': tf.ones([n], tf.float32)}

  ds = _read(builder, split, 0, 1, drop_remainder=False).enumerate()
  ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).unbatch()
  if view == 'dense':
    def shape_key(row):
      h, w = tf.unstack(tf.cast(tf.shape(row['image'])[:2], tf.int64))
      return h * 2**20 + w

    ds = ds.group_by_window(shape_key, lambda _, rows: rows.batch(batch_size),
                            window_size=batch_size)
  else:
    ds = ds.batch(batch_size)
  for batch in ds.prefetch(tf.data.AUTOTUNE).as_numpy_iterator():
    yield _pad(batch, batch_size)
