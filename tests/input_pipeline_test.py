"""Tests for vgg_flax.data.input_pipeline on digits, mocked tfds data and image folders."""

import collections
import itertools
import threading
import time

import numpy as np
import PIL.Image
from PIL import Image
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from vgg_flax import config as config_lib
from vgg_flax.data import input_pipeline as ip
from vgg_flax.data.input_pipeline import DataError
from vgg_flax.data import normalization


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
  monkeypatch.setenv('VGG_FLAX_CACHE_DIR', str(tmp_path_factory.mktemp('vgg_flax_cache')))


def _config(**overrides):
  """Small digits config; `input__flip=False` sets config.input.flip."""
  c = config_lib.get_base_config()
  c.dataset, c.image_size, c.batch_size = 'digits', 32, 8
  c.input.scale_min, c.input.scale_max = 32, 40
  c.input.mean, c.input.std = (33.0,), (50.0,)
  c.input.shuffle_buffer = 64
  for key, value in overrides.items():
    target = c.input if key.startswith('input__') else c
    setattr(target, key.removeprefix('input__'), value)
  return c


@pytest.fixture(scope='module')
def digits_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  ip.get_builder(_config(data_dir=data_dir))  # Builds once (a few seconds).
  return data_dir


def _setup(**overrides):
  config = _config(**overrides)
  builder = ip.get_builder(config)
  return config, builder, ip.dataset_info(config, builder)


def _take(iterator, n):
  return list(itertools.islice(iterator, n))


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])


def test_digits_info_and_train_batches(digits_dir):
  config, builder, info = _setup(data_dir=digits_dir)
  assert info == ip.DatasetInfo('digits', 10, 1, tuple('0123456789'), 'train', 'test', 1437, 360,
                                (33.0,), (50.0,))  # The config's constants: one per channel.
  assert ip.steps_per_epoch(config, info) == 1437 // 8
  batch = next(ip.train_batches(config, builder, info))
  assert batch['image'].shape == (8, 32, 32, 1) and batch['image'].dtype == np.float32
  assert batch['label'].shape == (8,) and batch['label'].dtype == np.int32
  assert 0 <= batch['label'].min() and batch['label'].max() <= 9
  # 'mean' normalization: raw 0-255 values shifted by input.mean.
  assert -33.0 <= batch['image'].min() and batch['image'].max() <= 255.0 - 33.0 + 1e-3


@pytest.mark.parametrize('cache', [False, True])
def test_train_batches_are_a_function_of_seed_and_step(digits_dir, cache):
  # 40 examples / batch 8 = 5 steps per epoch: 12 batches cross two epoch ends.
  config, builder, info = _setup(data_dir=digits_dir, train_split='train[:40]',
                                 input__cache=cache)
  assert ip.steps_per_epoch(config, info) == 5
  fresh = _take(ip.train_batches(config, builder, info), 12)
  _assert_same(fresh, _take(ip.train_batches(config, builder, info), 12))
  for start in (3, 5, 7):
    _assert_same(fresh[start:], _take(ip.train_batches(config, builder, info, start_step=start),
                                      12 - start))
  # Epochs are reshuffled: the second epoch is a different order of the same labels.
  epoch0 = np.concatenate([b['label'] for b in fresh[:5]])
  epoch1 = np.concatenate([b['label'] for b in fresh[5:10]])
  assert sorted(epoch0) == sorted(epoch1) and not np.array_equal(epoch0, epoch1)
  config.seed = 1
  other = _take(ip.train_batches(config, builder, info), 2)
  assert not np.array_equal(other[0]['image'], fresh[0]['image'])


def test_a_bounded_stream_ends_and_builds_no_epoch_past_its_end(digits_dir, monkeypatch):
  config, builder, info = _setup(data_dir=digits_dir, train_split='train[:40]')
  endless = _take(ip.train_batches(config, builder, info, start_step=3), 9)
  reads = []
  read = ip._read  # pylint: disable=protected-access
  monkeypatch.setattr(ip, '_read', lambda *a, **k: reads.append(1) or read(*a, **k))
  # Steps 3..11 of 5-step epochs: epochs 0, 1 and 2, and never epoch 3.
  bounded = list(ip.train_batches(config, builder, info, start_step=3, end_step=12))
  _assert_same(endless, bounded)
  assert len(reads) == 3
  assert not list(ip.train_batches(config, builder, info, start_step=5, end_step=5))


def _check_eval_coverage(config, builder, info, split, expected_labels, process_count):
  runs = [list(ip.eval_batches(config, builder, info, split, process_index=i,
                               process_count=process_count)) for i in range(process_count)]
  local = (config.eval_batch_size or config.batch_size) // process_count
  assert len({len(batches) for batches in runs}) == 1  # Lockstep across processes.
  labels = []
  for batch in itertools.chain(*runs):
    assert batch['image'].shape[0] == batch['label'].shape[0] == batch['mask'].shape[0] == local
    real = batch['mask'] == 1.0
    assert set(np.unique(batch['mask'])) <= {0.0, 1.0}
    assert not batch['image'][~real].any() and not batch['label'][~real].any()
    labels.extend(batch['label'][real])
  assert collections.Counter(labels) == collections.Counter(expected_labels)
  return runs


@pytest.mark.parametrize('cache', [False, True])
def test_global_order_gives_the_same_global_batches_on_two_processes(digits_dir, cache):
  config, builder, info = _setup(data_dir=digits_dir, input__cache=cache)
  steps = ip.steps_per_epoch(config, info)
  start = steps - 2  # Across the epoch boundary.
  single = _take(ip.train_batches(config, builder, info, start_step=start,
                                  process_index=0, process_count=1), 4)
  halves = [_take(ip.train_batches(config, builder, info, start_step=start,
                                   process_index=p, process_count=2), 4) for p in (0, 1)]
  assert all(b['label'].shape == (4,) for h in halves for b in h)
  joined = [{k: np.concatenate([a[k], b[k]]) for k in a} for a, b in zip(*halves)]
  _assert_same(single, joined)


def test_per_process_order_reads_disjoint_slices(digits_dir):
  config, builder, info = _setup(data_dir=digits_dir, input__order='per_process')
  assert ip.steps_per_epoch(config, info, process_count=2) == (1437 // 2) // 4
  # 40 examples, 2 processes, local batch 4: 5 steps of 20 examples each. Fixed
  # S = 32 on the 32 px digits, no flip: every batch row is an example's image.
  config, builder, info = _setup(data_dir=digits_dir, input__order='per_process',
                                 train_split='train[:40]', input__scale_min=32,
                                 input__scale_max=32, input__flip=False)
  assert ip.steps_per_epoch(config, info, process_count=2) == 5
  example = {ex['image'].tobytes(): i for i, ex in
             enumerate(tfds.as_numpy(builder.as_dataset(split='train[:40]')))}
  assert len(example) == 40  # Distinct images: a row names its example.
  epochs = []  # [process][epoch]: the examples read, sorted.
  for p in (0, 1):
    batches = _take(ip.train_batches(config, builder, info, process_index=p, process_count=2,
                                     normalized=False), 10)
    read = [example[image.tobytes()] for b in batches for image in b['image']]
    epochs.append([sorted(read[:20]), sorted(read[20:])])
    assert len(set(epochs[p][0])) == 20 and epochs[p][0] == epochs[p][1]  # Its slice, each epoch.
  assert not set(epochs[0][0]) & set(epochs[1][0])  # Disjoint...
  assert sorted(epochs[0][0] + epochs[1][0]) == list(range(40))  # ...and the whole split.


def test_eval_covers_every_example_once(digits_dir):
  config, builder, info = _setup(data_dir=digits_dir, eval_batch_size=64)
  expected = [ex['label'] for ex in tfds.as_numpy(builder.as_dataset(split='test'))]
  (batches,) = _check_eval_coverage(config, builder, info, None, expected, 1)
  assert len(batches) == 6 and sum(b['mask'].sum() for b in batches) == 360
  # 101 examples over 2 processes, local batch 10: slices of 51 and 50 examples;
  # the shorter one gets an all-padding batch so both run 6 eval steps.
  config.eval_batch_size = 20
  expected = [ex['label'] for ex in tfds.as_numpy(builder.as_dataset(split='test[:101]'))]
  runs = _check_eval_coverage(config, builder, info, 'test[:101]', expected, 2)
  assert len(runs[1]) == 6 and runs[1][-1]['mask'].sum() == 0


def test_registered_tfds_dataset_under_mock_data(tmp_path):
  # mock_data fakes the examples, but the real-unprepared check reads
  # dataset_info.json: write cifar10's metadata (with split sizes) to data_dir.
  builder = tfds.builder('cifar10', data_dir=str(tmp_path))
  builder.info.set_splits(tfds.core.SplitDict([
      tfds.core.SplitInfo(name=name, shard_lengths=[16], num_bytes=0)
      for name in ('train', 'test')]))
  builder.data_path.mkdir(parents=True)
  builder.info.write_to_directory(builder.data_path)
  config = _config(dataset='cifar10', data_dir=str(tmp_path), input__train_crop='center',
                   input__eval_resize=32, input__flip=False,
                   input__mean=(10.0, 20.0, 30.0), input__std=(1.0, 1.0, 1.0))
  with tfds.testing.mock_data(num_examples=16, data_dir=str(tmp_path)):
    builder = ip.get_builder(config)
    info = ip.dataset_info(config, builder)
    assert (info.num_classes, info.num_channels, info.num_train_examples) == (10, 3, 16)
    assert len(info.class_names) == 10 and info.eval_split == 'test'
    batches = _take(ip.train_batches(config, builder, info), 3)  # Crosses an epoch end.
    evals = list(ip.eval_batches(config, builder, info))
  for batch in batches + evals:
    assert batch['image'].shape == (8, 32, 32, 3) and batch['image'].dtype == np.float32
    assert batch['label'].dtype == np.int32
    raw = batch['image'] + np.array([10.0, 20.0, 30.0], np.float32)
    np.testing.assert_array_equal(raw, np.round(raw))  # Whole 0-255 values minus the mean.
    assert raw.min() >= 0 and raw.max() <= 255
  assert len(evals) == 2 and all(b['mask'].all() for b in evals)


@pytest.fixture
def image_folder(tmp_path):
  rng = np.random.default_rng(0)
  files = {'train/cat/a.png': (40, 48, 3), 'train/cat/b.png': (32, 32, 3),
           'train/dog/a.jpg': (50, 40, 3), 'train/dog/b.jpg': (36, 36, 3),
           'train/dog/grey.png': (32, 40), 'train/cat/rgba.png': (44, 32, 4),
           'test/cat/grey.png': (32, 32), 'test/dog/rgba.png': (32, 32, 4),
           'test/dog/c.jpg': (32, 32, 3)}
  arrays = {}
  for name, shape in files.items():
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays[name] = rng.integers(0, 256, shape, dtype=np.uint8)
    Image.fromarray(arrays[name]).save(path)
  (tmp_path / 'train/cat/notes.txt').write_text('ignored: not an image')
  return tmp_path, arrays


def test_image_folder_turns_grey_and_rgba_into_rgb(image_folder):
  root, arrays = image_folder
  config, builder, info = _setup(
      dataset='image_folder', data_dir=str(root), input__normalization='none',
      input__eval_resize=32, input__mean=(0.0, 0.0, 0.0), input__std=(1.0, 1.0, 1.0),
      batch_size=2, eval_batch_size=6)
  assert (info.num_classes, info.class_names, info.num_channels) == (2, ('cat', 'dog'), 3)
  assert (info.num_train_examples, info.num_eval_examples) == (6, 3)
  for batch in _take(ip.train_batches(config, builder, info), 4):
    assert batch['image'].shape == (2, 32, 32, 3)
  (batch,) = list(ip.eval_batches(config, builder, info))
  assert batch['mask'].tolist() == [1, 1, 1, 0, 0, 0]
  # 32x32 test images pass through unchanged: grey is replicated, alpha dropped.
  images = [batch['image'][i] for i in range(3)]
  grey = np.repeat(arrays['test/cat/grey.png'][:, :, None], 3, axis=2)
  assert any(np.array_equal(image, grey) for image in images)
  assert any(np.array_equal(image, arrays['test/dog/rgba.png'][:, :, :3]) for image in images)
  for count in (1, 2, 3):
    expected = [0, 1, 1]  # cat grey, dog rgba, dog jpg.
    _check_eval_coverage(config, builder, info, 'test', expected, count)


def test_corrupt_images_are_named_or_skipped_with_a_count(image_folder, caplog):
  root, _ = image_folder
  (root / 'train/dog/broken.jpg').write_bytes(b'not a jpeg at all')
  good = (root / 'train/cat/a.png').read_bytes()
  (root / 'train/cat/truncated.png').write_bytes(good[:len(good) // 2])
  common = dict(dataset='image_folder', data_dir=str(root), input__mean=(0.0, 0.0, 0.0),
                input__std=(1.0, 1.0, 1.0), batch_size=2)
  with pytest.raises(DataError, match=r'2 of 11 files in image folder .* are not readable '
                     r'images: .*train/cat/truncated.png, .*train/dog/broken.jpg\. Remove them, '
                     r'or set config.input.skip_corrupt=True'):
    _setup(**common)
  config, builder, info = _setup(**common, input__skip_corrupt=True)
  assert info.num_train_examples == 6  # The 6 good training images.
  assert 'Skipping 2 unreadable files of 11' in caplog.text
  assert next(ip.train_batches(config, builder, info))['image'].shape == (2, 32, 32, 3)
  assert (root / 'train/dog/broken.jpg').exists()  # The user's files are untouched.


def _folder_setup(root, **overrides):
  return _setup(dataset='image_folder', data_dir=str(root), input__mean=(0.0, 0.0, 0.0),
                input__std=(1.0, 1.0, 1.0), batch_size=2, **overrides)


def test_image_check_decodes_each_folder_version_once(image_folder, monkeypatch):
  root, _ = image_folder
  opened = []
  real_open = PIL.Image.open
  monkeypatch.setattr(PIL.Image, 'open', lambda f, *a, **k: (opened.append(1),
                                                              real_open(f, *a, **k))[1])
  _folder_setup(root)
  assert len(opened) == 9  # Every image, decoded by the first launch.
  opened.clear()
  _folder_setup(root)
  assert not opened  # An unchanged folder: the cached verdict, no decoding.
  # A rewritten (here truncated) file changes the folder: checked again, named.
  good = (root / 'train/cat/a.png').read_bytes()
  (root / 'train/cat/a.png').write_bytes(good[:len(good) // 2])
  with pytest.raises(DataError, match=r'1 of 9 files in image folder .*: .*train/cat/a\.png\.'):
    _folder_setup(root)
  assert len(opened) == 9


def test_next_epoch_is_read_before_this_one_ends(image_folder, monkeypatch):
  # The pipeline of epoch 2 is built, and its shuffle buffer (here the whole
  # epoch) filled, while epoch 1 is consumed: with the files gone once epoch 1
  # ends, epoch 2 still comes out, and as a run resumed there sees it.
  root, _ = image_folder
  config, builder, info = _folder_setup(root)
  built = threading.Semaphore(0)  # A release per epoch pipeline with its first batch made.
  started = ip._started  # pylint: disable=protected-access
  monkeypatch.setattr(ip, '_started', lambda batches: (started(batches), built.release())[0])
  steps = ip.steps_per_epoch(config, info)
  batches = ip.train_batches(config, builder, info)
  for _ in range(steps):
    next(batches)
  # Epoch 1 is consumed and the generator paused, as during the accelerator's
  # last step of the epoch: epoch 2 can only be built in the background now.
  for epoch in (1, 2):  # Waits for the event; the deadline only ends a failing run.
    assert built.acquire(timeout=60), f'epoch {epoch} was not built while epoch 1 was read'
  (root / 'train').rename(root / 'gone')
  second_epoch = _take(batches, steps)
  (root / 'gone').rename(root / 'train')
  _assert_same(second_epoch, _take(ip.train_batches(config, builder, info, start_step=steps),
                                   steps))


def test_uint8_batches_normalised_on_the_device_match_float32(digits_dir):
  config, builder, info = _setup(data_dir=digits_dir, input__normalization='mean_std',
                                 input__eval_resize=32, eval_batch_size=40)
  for floats, raw in zip(_take(ip.train_batches(config, builder, info), 2),
                         _take(ip.train_batches(config, builder, info, normalized=False), 2)):
    assert raw['image'].dtype == np.uint8 and raw['image'].shape == floats['image'].shape
    np.testing.assert_array_equal(raw['label'], floats['label'])
    # Only the rounding of the resized crop to whole 0-255 values differs.
    on_device = np.asarray(normalization.normalize_on_device(raw['image'], config))
    np.testing.assert_allclose(on_device, floats['image'], rtol=0, atol=0.5 / 50.0 + 1e-6)
  # 32 px digits at Q=32: no resampling, no rounding: the same values (to an ulp:
  # XLA may divide by the std as a multiplication by its inverse).
  floats = list(ip.eval_batches(config, builder, info, 'test[:50]'))
  raw = list(ip.eval_batches(config, builder, info, 'test[:50]', normalized=False))
  assert [b['image'].dtype for b in raw] == [np.uint8] * 2 and raw[1]['mask'].sum() == 10
  for f, r in zip(floats, raw):
    np.testing.assert_allclose(normalization.normalize_on_device(r['image'], config)
                               * r['mask'][:, None, None, None], f['image'], rtol=1e-6, atol=1e-6)


def test_scale_jitter_shapes_and_fixed_scale_is_the_centre_crop():
  image = tf.constant(np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8))
  seed = tf.constant([1, 2], tf.int32)
  config = _config(input__mean=(0.0, 0.0, 0.0), input__std=(1.0,) * 3, input__scale_max=64)
  jittered = [ip.preprocess_for_train(tf.constant(np.zeros((40, 60, 3), np.uint8) + i), s, config)
              for i, s in enumerate([seed, seed + 1])]
  assert all(x.shape == (32, 32, 3) and x.dtype == tf.float32 for x in jittered)
  config = _config(input__mean=(0.0, 0.0, 0.0), input__std=(1.0,) * 3, input__scale_max=32,
                   input__eval_resize=32, input__flip=False)
  np.testing.assert_array_equal(ip.preprocess_for_train(image, seed, config),
                                ip.preprocess_for_eval(image, config))
  config.input.scale_max = 64  # Random S in [32, 64] changes the picture.
  assert not np.array_equal(ip.preprocess_for_train(image, seed, config),
                            ip.preprocess_for_train(image, seed + 5, config))


def _training_scale(config, seed: int) -> float:
  """The S a training crop was taken at, read off a horizontal ramp: 240 / slope."""
  ramp = np.tile((np.arange(40) * 6).astype(np.uint8)[None, :, None], (40, 1, 1))
  crop = ip.preprocess_for_train(tf.constant(ramp), tf.constant([seed, 7], tf.int32), config)
  return 240.0 / float(np.mean(np.diff(crop.numpy()[16, 4:-4, 0])))


def test_scale_jitter_draws_s_per_image_from_the_range_and_fixed_s_is_fixed():
  config = _config(input__normalization='none', input__flip=False, input__scale_min=40,
                   input__scale_max=80)
  scales = [_training_scale(config, seed) for seed in range(40)]
  assert all(39.5 <= s <= 80.5 for s in scales)
  assert min(scales) < 48 and max(scales) > 72  # The whole [S_min, S_max] is drawn.
  config.input.scale_min = config.input.scale_max = 56  # Fixed-S training.
  np.testing.assert_allclose([_training_scale(config, seed) for seed in range(5)], 56, rtol=0.01)


def test_random_resized_crop_shape():
  image = tf.constant(np.random.default_rng(0).integers(0, 256, (50, 70, 1), dtype=np.uint8))
  config = _config(input__train_crop='random_resized', input__area_min=0.3)
  out = ip.preprocess_for_train(image, tf.constant([3, 4], tf.int32), config)
  assert out.shape == (32, 32, 1) and out.dtype == tf.float32


@pytest.mark.parametrize('mode, expected', [('mean', [-10.0, 30.0, 80.0]),
                                            ('mean_std', [-5.0, 7.5, 16.0]),
                                            ('none', [100.0, 100.0, 100.0])])
def test_normalize(mode, expected):
  config = _config(input__normalization=mode, input__mean=(110.0, 70.0, 20.0),
                   input__std=(2.0, 4.0, 5.0))
  out = ip.normalize(tf.fill([2, 2, 3], tf.constant(100, tf.uint8)), config)
  assert out.dtype == tf.float32
  np.testing.assert_array_equal(out[0, 0], expected)


def test_unprepared_registered_dataset_fails_fast(tmp_path):
  start = time.perf_counter()
  with pytest.raises(DataError, match=r'not prepared.*tfds build cifar10 --data_dir=DIR'):
    ip.get_builder(_config(dataset='cifar10', data_dir=str(tmp_path)))
  # tfds' own path to a missing dataset (a download) retries for about 200 s
  # before it fails: a generous bound that still tells the two apart.
  assert time.perf_counter() - start < 60.0
  with pytest.raises(DataError, match=r'manual download.*downloads/manual'):
    ip.get_builder(_config(dataset='imagenet2012', data_dir=str(tmp_path)))


@pytest.mark.parametrize('dataset, data_dir, match', [
    ('cifar1O', None, r"unknown dataset 'cifar1O'.*'cifar10'.*digits, image_folder"),
    ('image_folder', None, r'needs config.data_dir'),
    ('image_folder', 'missing', r'image folder .*missing .*does not exist'),
    ('image_folder', 'empty_class', r'class folder .*empty_class/train/dog holds no images'),
    ('image_folder', 'no_splits', r'image folder .*no_splits \(config.data_dir\) holds no class '
     r'folders; expected .*no_splits/<class>/<image> \(.jpg, .jpeg, .png, .bmp, .gif, .webp\).'),
])
def test_bad_dataset_errors(tmp_path, dataset, data_dir, match):
  (tmp_path / 'empty_class/train/cat').mkdir(parents=True)
  (tmp_path / 'empty_class/train/dog').mkdir()
  Image.new('RGB', (32, 32)).save(tmp_path / 'empty_class/train/cat/a.png')
  (tmp_path / 'no_splits').mkdir()
  with pytest.raises(DataError, match=match):
    ip.get_builder(_config(dataset=dataset, data_dir=data_dir and str(tmp_path / data_dir)))


def test_constants_of_another_channel_count_are_measured_on_the_training_split(digits_dir):
  # RGB constants on the one-channel digits are never applied: the digits' own
  # are measured, and they are the ones configs/default.py states (77.7, 82.5).
  config = _config(data_dir=digits_dir, input__mean=(1.0, 2.0, 3.0), input__std=(1.0,) * 3,
                   input__normalization='mean_std')
  builder = ip.get_builder(config)
  info = ip.dataset_info(config, builder)
  assert len(info.mean) == len(info.std) == 1
  assert info.mean[0] == pytest.approx(77.7, rel=0.02) and info.std[0] == pytest.approx(82.5,
                                                                                         rel=0.02)
  batch = next(ip.train_batches(config, builder, info))  # Normalised with them.
  assert abs(batch['image'].mean()) < 0.3 and 0.7 < batch['image'].std() < 1.3


def test_config_mismatch_errors(digits_dir):
  config = _config(data_dir=digits_dir)
  builder = ip.get_builder(config)
  with pytest.raises(DataError, match=r"eval_split='val'.*available: \['test', 'train'\]"):
    ip.dataset_info(_config(data_dir=digits_dir, eval_split='val'), builder)
  info = ip.dataset_info(_config(data_dir=digits_dir), builder)
  with pytest.raises(DataError, match=r'batch_size=10 is not divisible.*\(3\)'):
    ip.steps_per_epoch(_config(batch_size=10), info, process_count=3)
  with pytest.raises(DataError, match=r'eval_batch_size=5 is not divisible'):
    next(ip.eval_batches(_config(eval_batch_size=5), builder, info, process_count=2))
