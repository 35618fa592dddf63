"""Input pipelines: batch streams for training, evaluation and the test protocol.

Training batches are a deterministic function of (config.seed, step), so a
resumed run sees exactly the batches a run without interruption would have
seen. Nothing here ever reaches for the network.

The pipeline's roles have their modules: `data_sources` (tfds datasets, the
checks and the normalisation constants), `image_folders` (folders of images),
`preprocessing` (resize, crop, augment, normalise one image) and this one
(`get_builder` and `dataset_info` over both kinds of source, batches per
process). Their public names are re-exported here, so `input_pipeline` is the
one import a caller needs.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import math
import sys
from typing import Iterator

import jax
import ml_collections
import numpy as np
from vgg_flax.runtime.quiet_tf import graph_fn, tf
import tensorflow_datasets as tfds

from vgg_flax.data import data_sources
from vgg_flax.data import image_folders
from vgg_flax.data import preprocessing
# Re-exported, so that callers need this one import.
from vgg_flax.data.data_sources import (  # pylint: disable=unused-import
    BUILT_IN, DataError, DatasetInfo, with_constants)
from vgg_flax.data.image_folders import IMAGE_FOLDER_EXTENSIONS  # pylint: disable=unused-import
from vgg_flax.data.normalization import (  # pylint: disable=unused-import
    CAFFE_BGR_MEAN, TORCHVISION_MEAN, TORCHVISION_STD)
from vgg_flax.data.preprocessing import (  # pylint: disable=unused-import
    TOTAL_STRIDE, crop_offsets, dense_image, multicrop_images, normalize, preprocess_for_eval,
    preprocess_for_train)

Batch = dict[str, np.ndarray]
PROTOCOL_VIEWS = ('center', 'dense', 'multicrop')


def get_builder(config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """The checked builder of `config.dataset`: 'image_folder' (`image_folders`), 'digits' or
  a prepared tfds dataset (`data_sources.tfds_builder`); never downloads.

  Raises:
    DataError: naming the dataset, folder or field, and what to do.
  """
  data_sources.keep_tf_off_accelerators()
  if config.dataset == 'image_folder':
    return image_folders.get_builder(config)
  return data_sources.tfds_builder(config)


def dataset_info(config: ml_collections.ConfigDict,
                 builder: tfds.core.DatasetBuilder | None = None) -> DatasetInfo:
  """`data_sources.dataset_info`: the dataset checked against the config, and the
  normalisation constants; `builder` defaults to `get_builder(config)`."""
  return data_sources.dataset_info(config, builder or get_builder(config))


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
  image_key, label_key = data_sources.feature_keys(builder)
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
  return ds.map(graph_fn(lambda ex: (ex[image_key], tf.cast(ex[label_key], tf.int32))))


def _seeds(*entropy: int) -> tuple[int, int, tuple[int, int]]:
  """File-order seed, shuffle seed and stateless augmentation key."""
  s = np.random.SeedSequence(list(entropy)).generate_state(4, dtype=np.uint32)
  return int(s[0]), int(s[1]), (int(s[2] >> 1), int(s[3] >> 1))  # int32-safe key.


def train_batches(config: ml_collections.ConfigDict, builder: tfds.core.DatasetBuilder,
                  info: DatasetInfo, *, start_step: int = 0, end_step: int | None = None,
                  process_index: int | None = None, process_count: int | None = None,
                  normalized: bool = True) -> Iterator[Batch]:
  """Training batches start_step..end_step-1; batch k depends only on (config.seed, k).

  Each epoch is its own tf.data pipeline, seeded by (seed, epoch): file order,
  example shuffle, and per-example augmentation keys folded with the example's
  index in the epoch. Resuming at `start_step` therefore skips encoded
  examples of that epoch without decoding or augmenting them. The next epoch's
  pipeline is built and its shuffle buffer filled in the background before
  this one ends, so the epoch boundary costs no refill wait.

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
    end_step: the stream ends before this batch (None: endless). No epoch is
      built ahead past it: at the end of training, an unused pipeline would
      cost a full shuffle buffer of reading and a slow teardown.
    process_index, process_count: default jax.process_index(), process_count().
    normalized: False: uint8 images, to normalise on the device with
      `normalization.normalize_on_device` (a quarter of the bytes to move).

  Yields:
    {'image': float32 (local_batch, S, S, C), 'label': int32 (local_batch,)},
    local_batch = batch_size // process_count; 'image' is uint8 if not `normalized`.
  """
  index, count = _process(process_index, process_count)
  config = with_constants(config, info.mean, info.std)  # The run's (dataset_info).
  local_batch = _local_batch(config.batch_size, count, 'batch_size')
  steps = steps_per_epoch(config, info, count)
  epoch, skip_batches = divmod(start_step, steps)
  global_order = config.input.order == 'global'
  # What this process reads and how it seeds: the whole split, process-free, in
  # 'global' order; its own slice, seeded by its index too, in 'per_process'.
  read_index, read_count = (0, 1) if global_order else (index, count)
  stream_batch = config.batch_size if global_order else local_batch
  decode = builder.info.features[data_sources.feature_keys(builder)[0]].decode_example
  cached = (None if not config.input.cache else
            # One in-memory copy of the encoded examples, read in a fixed file order
            # (a per-epoch order would tie a resumed run's order to its start epoch).
            _read(builder, info.train_split, read_index, read_count, drop_remainder=True).cache())

  def epoch_batches(epoch: int, skip_batches: int) -> Iterator[Batch]:
    file_seed, shuffle_seed, aug_key = _seeds(config.seed, read_index, epoch)
    examples = cached if cached is not None else _read(
        builder, info.train_split, read_index, read_count, drop_remainder=True,
        shuffle_seed=file_seed)
    aug_key_t = tf.constant(aug_key, tf.int32)

    def prepare(i, example):
      image, label = example
      seed = tf.random.experimental.stateless_fold_in(aug_key_t, tf.cast(i, tf.int32))
      image = preprocess_for_train(decode(image), seed, config, normalized=normalized)
      return {'image': image, 'label': label}

    ds = examples.shuffle(config.input.shuffle_buffer, seed=shuffle_seed).enumerate()
    # Whole batches only, so that every process yields `steps` batches.
    ds = ds.take(steps * stream_batch).skip(skip_batches * stream_batch)
    if global_order and count > 1:  # Keep this process's rows of each global batch.
      ds = ds.filter(graph_fn(lambda i, _: (i % stream_batch) // local_batch == index))
    ds = ds.map(graph_fn(prepare), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(local_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return _started(ds.as_numpy_iterator())

  # The next epoch's pipeline starts in the background while this one still has
  # `ahead` batches to give: when its shuffle buffer starts to drain (so the two
  # buffers together hold about one buffer's worth), and at least 2 batches
  # early. Its buffer is full and its first batch ready when this epoch ends,
  # instead of the accelerator waiting for the refill.
  ahead = max(2, math.ceil(config.input.shuffle_buffer / stream_batch))
  pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix='vgg_flax_epochs')
  batches = upcoming = None
  try:
    last_epoch = None if end_step is None else (end_step - 1) // steps
    if end_step is not None and start_step >= end_step:
      return
    batches = epoch_batches(epoch, skip_batches)
    while True:
      end = steps if epoch != last_epoch else end_step - epoch * steps
      for left in range(end - skip_batches, 0, -1):
        if upcoming is None and left <= ahead and epoch != last_epoch:
          upcoming = pool.submit(epoch_batches, epoch + 1, 0)
        yield next(batches)
      if epoch == last_epoch:
        return
      epoch, skip_batches = epoch + 1, 0
      # Tearing down a tf.data iterator waits for up to seconds (0.5-5 s measured
      # here): the old epoch's goes in the background, off the step's path.
      old, batches = [batches], None
      pool.submit(_release, old)
      batches, upcoming = upcoming.result(), None
  finally:  # Also when closed early: a build in flight ends first.
    # No new work for the pool here: a generator that is not closed explicitly
    # is finalised by the garbage collector, in whatever thread it runs, even
    # one starting up while another holds the lock that submitting needs (a
    # deadlock seen in the test suite). The teardown then happens right here.
    if upcoming is not None:
      concurrent.futures.wait([upcoming])
    batches = upcoming = None
    pool.shutdown(wait=False)


def _release(objects: list) -> None:
  """Drops the references in `objects` here: the caller keeps none, so they go in this thread."""
  objects.clear()


def _started(batches: Iterator[Batch]) -> Iterator[Batch]:
  """`batches` with its first batch made: the pipeline built and its buffers filling."""
  first = next(batches)
  return itertools.chain([first], batches)


def eval_batches(config: ml_collections.ConfigDict, builder: tfds.core.DatasetBuilder,
                 info: DatasetInfo, split: str | None = None, *,
                 process_index: int | None = None, process_count: int | None = None,
                 normalized: bool = True) -> Iterator[Batch]:
  """One pass over `split`: every example exactly once across processes.

  Every process yields the same number of batches of the same size (the
  compiled eval step runs in lockstep); padding examples have mask 0.

  Args:
    config: uses `eval_batch_size` (0 = `batch_size`), `image_size`, `input.*`.
    builder, info: from `get_builder(config)` and `dataset_info(config, builder)`.
    split: default `info.eval_split`.
    process_index, process_count: default jax.process_index(), process_count().
    normalized: False: uint8 images, as in `train_batches`.

  Yields:
    {'image': float32 (local_batch, S, S, C), 'label': int32 (local_batch,),
     'mask': float32 (local_batch,)}; 'image' is uint8 if not `normalized`.
  """
  index, count = _process(process_index, process_count)
  config = with_constants(config, info.mean, info.std)  # The run's (dataset_info).
  field = 'eval_batch_size' if config.eval_batch_size else 'batch_size'
  local_batch = _local_batch(config.eval_batch_size or config.batch_size, count, field)
  split = split or info.eval_split
  n = (info.num_eval_examples if split == info.eval_split
       else data_sources.num_examples(builder, split, 'split'))
  # The largest process slice has ceil(n / count) examples, whatever the scheme.
  num_batches = math.ceil(math.ceil(n / count) / local_batch)
  decode = builder.info.features[data_sources.feature_keys(builder)[0]].decode_example

  def prepare(image, label):
    return {'image': preprocess_for_eval(decode(image), config, normalized=normalized),
            'label': label,
            'mask': tf.constant(1.0, tf.float32)}

  ds = _read(builder, split, index, count, drop_remainder=False)
  ds = ds.map(graph_fn(prepare), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(local_batch).prefetch(tf.data.AUTOTUNE)
  shape = (local_batch, config.image_size, config.image_size, info.num_channels)
  done = 0
  for batch in ds.as_numpy_iterator():
    yield _pad(batch, local_batch)
    done += 1
  for _ in range(done, num_batches):  # This process's slice ran out first.
    yield {'image': np.zeros(shape, np.float32 if normalized else np.uint8),
           'label': np.zeros(local_batch, np.int32),
           'mask': np.zeros(local_batch, np.float32)}


def _pad(batch: Batch, size: int) -> Batch:
  """Zero-pads a short (last) batch to `size` rows; the padding rows have mask 0."""
  missing = size - len(batch['mask'])
  if not missing:
    return batch
  return {k: np.concatenate([v, np.zeros((missing,) + v.shape[1:], v.dtype)])
          for k, v in batch.items()}


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
  decode = builder.info.features[data_sources.feature_keys(builder)[0]].decode_example

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
  ds = ds.map(graph_fn(prepare), num_parallel_calls=tf.data.AUTOTUNE,
              deterministic=True).unbatch()
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
