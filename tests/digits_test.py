"""Tests for the built-in `digits` tfds dataset (scikit-learn's bundled digits)."""

import functools
import socket
import threading

import numpy as np
import pytest
from sklearn import datasets as sk_datasets
import tensorflow_datasets as tfds

from vgg_flax.data import digits


def _build(data_dir):
  builder = digits.Digits(data_dir=str(data_dir))
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return builder


def _examples(builder, split):
  """(label, image bytes) of every example, in a canonical order."""
  return sorted((int(ex['label']), ex['image'].tobytes())
                for ex in tfds.as_numpy(builder.as_dataset(split=split)))


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  # Any attempt to open a connection fails the build: it must be offline.
  with pytest.MonkeyPatch.context() as mp:
    def no_network(*args, **kwargs):
      raise AssertionError('the digits build tried to use the network')
    mp.setattr(socket.socket, 'connect', no_network)
    return _build(tmp_path_factory.mktemp('digits_a'))


def test_registered_without_clash():
  assert 'digits' in tfds.list_builders(with_community_datasets=False)
  assert tfds.builder_cls('digits') is digits.Digits


def test_builds_offline_with_the_stratified_split(built):
  assert built.is_prepared()
  assert built.info.splits['train'].num_examples == 1437
  assert built.info.splits['test'].num_examples == 360
  assert built.info.features['label'].names == [str(i) for i in range(10)]
  assert built.info.supervised_keys == ('image', 'label')
  # Stratified 80/20: each class of load_digits (174 to 183 images) splits
  # 80/20 to within the rounding of one example.
  total = np.bincount(sk_datasets.load_digits().target, minlength=10)
  counts = {split: np.bincount([label for label, _ in _examples(built, split)], minlength=10)
            for split in ('train', 'test')}
  assert counts['train'].sum() == 1437 and counts['test'].sum() == 360
  np.testing.assert_array_equal(counts['train'] + counts['test'], total)
  assert np.abs(counts['test'] - 0.2 * total).max() <= 1, counts['test'] / total


def test_images_are_32x32_grey_uint8_on_the_0_255_scale(built):
  images = np.stack([ex['image'] for ex in tfds.as_numpy(built.as_dataset(split='test'))])
  assert images.shape == (360, 32, 32, 1) and images.dtype == np.uint8
  assert images.max() > 200 and images.min() == 0  # Scaled from 0-16, not left there.


def test_train_and_test_are_disjoint_and_cover_load_digits():
  idx = digits.split_indices()
  assert len(np.intersect1d(idx['train'], idx['test'])) == 0
  assert len(np.union1d(idx['train'], idx['test'])) == 1797


def test_second_build_gives_the_same_split(built, tmp_path):
  again = _build(tmp_path)
  for split in ('train', 'test'):
    assert _examples(again, split) == _examples(built, split)


def _run_two_processes(data_dirs):
  """digits.prepare on two 'processes' (threads) with real barriers that time out.

  A barrier that only one process reaches raises BrokenBarrierError after the
  timeout instead of hanging: a deadlock of a real job fails the test.
  """
  rendezvous = threading.Barrier(2, timeout=30)
  shared, calls, results = [None, None], [[], []], [None, None]

  def gather(index, value):
    shared[index] = value
    rendezvous.wait()
    out = list(shared)
    rendezvous.wait()
    return out

  def barrier(index, name):
    calls[index].append(name)
    rendezvous.wait()

  def run(index):
    processes = digits.Processes(index, 2, functools.partial(gather, index),
                                 functools.partial(barrier, index))
    try:
      results[index] = digits.prepare(data_dirs[index], processes).is_prepared()
    except threading.BrokenBarrierError as e:
      results[index] = e

  threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=120)
  return results, calls


def test_two_processes_with_one_data_dir_each_meet_at_the_same_barriers(built, tmp_path):
  # Process 0's data_dir is prepared, process 1's is empty: only process 1 has
  # work, and both must still reach the same barriers (a job would deadlock).
  prepared = built.data_dir.split('/digits/')[0]
  results, calls = _run_two_processes([prepared, str(tmp_path / 'host1')])
  assert results == [True, True]
  assert calls[0] == calls[1] == ['vgg_flax: digits prepared by process 1']
  assert digits.Digits(data_dir=str(tmp_path / 'host1')).is_prepared()
  # Prepared everywhere: no barrier at all.
  assert _run_two_processes([prepared, str(tmp_path / 'host1')]) == ([True, True], [[], []])


def test_two_processes_sharing_a_data_dir_build_it_once(tmp_path, monkeypatch):
  builds = []
  real_build = digits._build  # pylint: disable=protected-access
  monkeypatch.setattr(digits, '_build',
                      lambda b, d: (builds.append(b.data_dir), real_build(b, d)))
  results, calls = _run_two_processes([str(tmp_path / 'shared')] * 2)
  assert results == [True, True] and len(builds) == 1
  assert calls[0] == calls[1] == [f'vgg_flax: digits prepared by process {i}' for i in (0, 1)]


def test_independent_trainers_building_one_data_dir_at_once_both_get_it(tmp_path):
  # A sweep's runs side by side: separate jobs, no barrier between them. The
  # slower build finds the folder renamed into place by the other one
  # (FileExistsError before the fix).
  alone = digits.Processes(0, 1, lambda x: [x], lambda name: None)
  start, results = threading.Barrier(2), []

  def run():
    start.wait()
    try:
      results.append(digits.prepare(str(tmp_path), alone).is_prepared())
    except Exception as e:  # pylint: disable=broad-except
      results.append(repr(e))
  threads = [threading.Thread(target=run) for _ in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=120)
  assert results == [True, True]
