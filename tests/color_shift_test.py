"""AlexNet's PCA colour shift (input.color_shift): one RGB offset per image, from its own key."""

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from vgg_flax import config as config_lib
from vgg_flax.data import input_pipeline as ip
from vgg_flax.data import preprocessing

EIGVAL = np.array([0.2175, 0.0188, 0.0045])  # fb.resnet.torch's ImageNet PCA, 0-1 scale.
EIGVEC = np.array([[-0.5675, 0.7192, 0.4009],
                   [-0.5808, -0.0045, -0.8140],
                   [-0.5836, -0.6948, 0.4203]])


def alexnet_shift(alpha):
  """Krizhevsky et al. 2012, section 4.1: [p1, p2, p3] [a1 l1, a2 l2, a3 l3]^T, on 0-255."""
  return 255.0 * EIGVEC @ (np.asarray(alpha, np.float64) * EIGVAL)


def _config(sigma, **inputs):
  config = config_lib.get_base_config()
  config.image_size = 32
  config.input.update(dict(scale_min=40, scale_max=48, normalization='none', color_shift=sigma,
                           **inputs))
  return config


def _image(shape=(50, 60, 3), seed=0):
  return tf.constant(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8))


def _alpha(seed, sigma):
  """The draw the shift uses: N(0, sigma^2) x 3 from the example's colour key."""
  return sigma * tf.random.stateless_normal([3], preprocessing.color_seed(seed)).numpy()


def test_the_shift_is_alexnets_formula_per_image_and_the_geometry_is_unchanged():
  image = _image()
  shifts = []
  for k in range(4):
    seed = tf.constant([7, k], tf.int32)
    on = preprocessing.preprocess_for_train(image, seed, _config(0.1)).numpy()
    off = preprocessing.preprocess_for_train(image, seed, _config(0.0)).numpy()
    expected = alexnet_shift(_alpha(seed, 0.1))
    # Every pixel of the same crop (same scale, crop, flip) moves by the same RGB offset.
    np.testing.assert_allclose(on - off, np.broadcast_to(expected, on.shape), atol=2e-3)
    shifts.append(expected)
  assert len({tuple(np.round(s, 3)) for s in shifts}) == 4  # One draw per example key.
  assert 0 < np.abs(shifts).max() < 60  # A few grey levels: sigma 0.1 of eigenvalues x 255.


def test_the_weights_have_the_configured_sigma():
  # The shift solved back for alpha (the eigenvectors are orthonormal) over many images.
  alphas = []
  for k in range(400):
    seed = tf.constant([3, k], tf.int32)
    shift = preprocessing.color_shift(seed, 0.1).numpy()
    alphas.append(EIGVEC.T @ (shift / 255.0) / EIGVAL)
    np.testing.assert_allclose(alphas[-1], _alpha(seed, 0.1), atol=1e-3)
  np.testing.assert_allclose(np.std(alphas, axis=0), 0.1, rtol=0.15)
  np.testing.assert_allclose(np.mean(alphas, axis=0), 0.0, atol=0.02)


def test_off_gives_the_images_of_a_config_without_the_field():
  image, seed = _image(), tf.constant([1, 2], tf.int32)
  old = _config(0.0)
  del old.input['color_shift']  # A run's config.json from before the field existed.
  np.testing.assert_array_equal(preprocessing.preprocess_for_train(image, seed, _config(0.0)),
                                preprocessing.preprocess_for_train(image, seed, old))


def test_images_that_are_not_rgb_are_refused():
  with pytest.raises(ip.DataError, match=r'config.input.color_shift=0.1 needs RGB images; these '
                     r'have 1 channel\(s\). Set it to 0.'):
    preprocessing.preprocess_for_train(_image((40, 40, 1)), tf.constant([0, 0], tf.int32),
                                       _config(0.1))


def test_training_batches_shift_each_example_by_its_seed_step_index_key(tmp_path):
  for k, shape in enumerate([(40, 48), (48, 40), (44, 44), (40, 40)]):
    path = tmp_path / 'train' / f'c{k % 2}' / f'{k}.png'
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(_image(shape + (3,), seed=k))).save(path)

  def batches(sigma, start_step=0):
    config = _config(sigma, mean=(0.0,) * 3, std=(1.0,) * 3, shuffle_buffer=8)
    config.update(dict(dataset='image_folder', data_dir=str(tmp_path), eval_split='train',
                       batch_size=2))
    builder = ip.get_builder(config)
    info = ip.dataset_info(config, builder)
    return list(ip.train_batches(config, builder, info, start_step=start_step, end_step=4))

  on, off = batches(0.1), batches(0.0)
  assert len(on) == len(off) == 4
  _, _, aug_key = ip._seeds(0, 0, 0)  # pylint: disable=protected-access  # (seed, process, epoch 0)
  for step in range(2):  # Epoch 0: example i of the epoch has key fold_in(aug_key, i).
    for row in range(2):
      seed = tf.random.experimental.stateless_fold_in(tf.constant(aug_key, tf.int32),
                                                      2 * step + row)
      diff = on[step]['image'][row] - off[step]['image'][row]
      np.testing.assert_allclose(diff, np.broadcast_to(alexnet_shift(_alpha(seed, 0.1)),
                                                       diff.shape), atol=2e-3)
  # A resumed stream gives the same shifted batches (the key does not depend on where it started).
  resumed = batches(0.1, start_step=2)
  assert len(resumed) == 2
  for a, b in zip(on[2:], resumed):
    np.testing.assert_array_equal(a['image'], b['image'])
