"""Image preprocessing in TensorFlow: resize, crop, augment, normalise.

Everything here maps one decoded uint8 HxWxC image to float32 arrays the
model reads: the training augmentation (scale jitter, random-resized crops,
flips, AlexNet's colour shift) driven only by a stateless seed, the evaluation centre crop, and the
views of the paper's test protocol (multi-crop grids, whole images for dense
evaluation). The normalisation itself: `normalization` (no TensorFlow).
"""

from __future__ import annotations

import ml_collections
from vgg_flax.runtime.quiet_tf import tf

from vgg_flax import config as config_lib
from vgg_flax.data import normalization
from vgg_flax.data.data_sources import DataError

# AlexNet's colour augmentation (Krizhevsky et al. 2012, section 4.1), which the
# VGG paper keeps: eigenvalues and eigenvectors (columns) of the covariance of
# ImageNet's RGB pixel values on the 0-1 scale, as fb.resnet.torch published
# them (and timm and GluonCV reuse).
IMAGENET_PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_PCA_EIGVEC = ((-0.5675, 0.7192, 0.4009),
                       (-0.5808, -0.0045, -0.8140),
                       (-0.5836, -0.6948, 0.4203))
# Folded into an example's seed for its colour key: the three keys that the
# geometric augmentations split off stay what they were, and so do their crops.
_COLOR_STREAM = 3


def normalize(image: tf.Tensor, config: ml_collections.ConfigDict) -> tf.Tensor:
  """Casts to float32 and applies `config.input.preset`, else `input.normalization`.

  Presets: 'torchvision' scales RGB to 0-1, then (x - mean) / std; 'caffe'
  reverses RGB to BGR and subtracts the BGR means on the 0-255 scale.
  """
  # A crop can lose the static channel count (None): those pass.
  if config.input.get('preset', '') and image.shape[-1] not in (None, 3):
    raise DataError(f'config.input.preset={config.input.preset!r} needs RGB images; '
                    f'these have {image.shape[-1]} channel(s).')
  return normalization.normalized(tf.cast(image, tf.float32), config,
                                  lambda v: tf.constant(v, tf.float32))


def to_uint8(image: tf.Tensor) -> tf.Tensor:
  """A resized (fractional) 0-255 image rounded to uint8: a quarter of float32's bytes."""
  return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def resize_smaller_side(image: tf.Tensor, side) -> tf.Tensor:
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


def color_seed(seed: tf.Tensor) -> tf.Tensor:
  """The colour shift's key, from an example's augmentation seed (shape [2] int32)."""
  return tf.random.experimental.stateless_fold_in(seed, _COLOR_STREAM)


def color_shift(seed: tf.Tensor, sigma: float) -> tf.Tensor:
  """AlexNet's PCA colour shift of one image: the RGB offset added to every pixel.

  offset = 255 * sum_i alpha_i * eigval_i * eigvec_i, alpha_i ~ N(0, sigma^2),
  one draw of alpha per image from `color_seed(seed)`.

  Returns:
    float32 (3,): the offset on the 0-255 scale.
  """
  alpha = tf.random.stateless_normal([3], color_seed(seed), stddev=sigma, dtype=tf.float32)
  weights = alpha * tf.constant(IMAGENET_PCA_EIGVAL, tf.float32)
  return 255.0 * tf.linalg.matvec(tf.constant(IMAGENET_PCA_EIGVEC, tf.float32), weights)


def preprocess_for_eval(image: tf.Tensor, config: ml_collections.ConfigDict,
                        scale: int | None = None, *, normalized: bool = True) -> tf.Tensor:
  """Resizes the smaller side to Q (`scale`, default `config.eval_scale`), centre-crops, normalizes.

  With `normalized=False` the crop is rounded to uint8 instead (`to_uint8`), for
  `normalize_on_device`.
  """
  image = _center_crop(resize_smaller_side(image, scale or config_lib.eval_scale(config)),
                       config.image_size)
  return normalize(image, config) if normalized else to_uint8(image)


def preprocess_for_train(image: tf.Tensor, seed: tf.Tensor, config: ml_collections.ConfigDict,
                         *, normalized: bool = True) -> tf.Tensor:
  """Augments a decoded uint8 HxWxC image (static C) to a normalized float32 crop.

  Args:
    image: decoded uint8 image, HxWxC.
    seed: shape [2] int32 seed: the only randomness (TF's stateless ops); the
      scale, crop and flip keys are split from it, the colour key folded in.
    config: uses `image_size` and `input.*`.
    normalized: False: the crop rounded to uint8 (`to_uint8`), not normalised,
      for `normalize_on_device`.
  """
  size, cfg = config.image_size, config.input
  scale_seed, crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
  if cfg.train_crop == 'scale_jitter':  # The paper: smaller side S ~ U{scale_min..scale_max}.
    side = tf.random.stateless_uniform(
        [], scale_seed, minval=cfg.scale_min, maxval=cfg.scale_max + 1, dtype=tf.int32)
    image = resize_smaller_side(image, side)
    image = tf.image.stateless_random_crop(image, [size, size, image.shape[-1]], crop_seed)
  elif cfg.train_crop == 'random_resized':  # Inception-style area and aspect jitter.
    begin, crop, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image), bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        seed=crop_seed, min_object_covered=cfg.area_min, aspect_ratio_range=(3 / 4, 4 / 3),
        area_range=(cfg.area_min, 1.0), max_attempts=10, use_image_if_no_bounding_boxes=True)
    image = _resize(tf.slice(image, begin, crop), [size, size])
  elif cfg.train_crop == 'center':
    image = _center_crop(resize_smaller_side(image, config_lib.eval_scale(config)), size)
  else:
    raise ValueError(f'config.input.train_crop={cfg.train_crop!r} is not allowed.')
  if cfg.flip:
    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
  sigma = cfg.get('color_shift', 0.0)
  if sigma:  # Off: not even a zero added, so the images are today's, bit for bit.
    if image.shape[-1] != 3:
      raise DataError(f'config.input.color_shift={sigma} needs RGB images; these have '
                      f'{image.shape[-1]} channel(s). Set it to 0.')
    # On the 0-255 values before normalisation, unclipped as in AlexNet (uint8
    # transfer rounds and clips it to 0-255).
    image = image + color_shift(seed, sigma)
  return normalize(image, config) if normalized else to_uint8(image)


# The paper's test protocol (section 3.2). VGG halves the image five times: a
# map of side H gives H // 32 feature pixels, whatever the remainder.
TOTAL_STRIDE = 32


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
  image = normalize(resize_smaller_side(image, scale), config)  # Once, not per crop.
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
  image = resize_smaller_side(image, scale)
  hw = tf.shape(image)[:2]
  keep = hw // TOTAL_STRIDE * TOTAL_STRIDE
  image = tf.image.crop_to_bounding_box(image, (hw[0] - keep[0]) // 2, (hw[1] - keep[1]) // 2,
                                        keep[0], keep[1])
  return normalize(image, config)


