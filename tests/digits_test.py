"""Tests for the built-in `digits` tfds dataset (scikit-learn's bundled digits)."""

import socket

import numpy as np
import pytest
import tensorflow_datasets as tfds

from vgg_flax import datasets
from vgg_flax.datasets import digits


def _build(data_dir):
  builder = datasets.Digits(data_dir=str(data_dir))
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
  assert tfds.builder_cls('digits') is datasets.Digits


def test_builds_offline_with_the_stratified_split(built):
  assert built.is_prepared()
  assert built.info.splits['train'].num_examples == 1437
  assert built.info.splits['test'].num_examples == 360
  assert built.info.features['label'].names == [str(i) for i in range(10)]
  assert built.info.supervised_keys == ('image', 'label')
  for split, size in [('train', 1437), ('test', 360)]:
    examples = _examples(built, split)
    labels = np.array([label for label, _ in examples])
    assert len(examples) == size
    # Stratified: every class present, each with its ~80 % / 20 % share.
    counts = np.bincount(labels, minlength=10)
    assert counts.min() > 0 and labels.max() == 9
    fraction = 0.8 if split == 'train' else 0.2
    np.testing.assert_allclose(counts / counts.sum(), np.full(10, 0.1), atol=0.01)
    assert abs(size - fraction * 1797) < 1


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
