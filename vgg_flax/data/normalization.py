"""The input normalisation (config.input.preset, .normalization, .mean, .std), in one place.

`preprocessing.normalize` applies it in the tf.data pipeline; `normalize_on_device`
inside the jitted step, to uint8 batches. This module imports no TensorFlow, so
the train step (and `vgg_flax.aot`, the benchmark) loads without it.
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections

# The preprocessing imported weights were trained with (config.input.preset).
TORCHVISION_MEAN, TORCHVISION_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # RGB, 0-1.
CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)  # keras.applications.vgg16.preprocess_input.


def normalize_on_device(images, config: ml_collections.ConfigDict):
  """`preprocessing.normalize` in JAX, for uint8 batches normalised on the device.

  The same arithmetic as `preprocessing.normalize`, so a uint8 image gives the same float32
  values either way; inside a jitted step XLA fuses it into the first layer.
  """
  return normalized(jnp.asarray(images, jnp.float32), config,
                     lambda v: jnp.asarray(v, jnp.float32))


def normalized(image, config: ml_collections.ConfigDict, constant):
  """The normalisation of a float32 image; `constant` makes a float32 array of the library."""
  preset = config.input.get('preset', '')
  if preset:
    if preset == 'torchvision':
      return (image / 255.0 - constant(TORCHVISION_MEAN)) / constant(TORCHVISION_STD)
    if preset == 'caffe':
      return image[..., ::-1] - constant(CAFFE_BGR_MEAN)
    raise ValueError(f"config.input.preset={preset!r} is not allowed: expected one of "
                     "'', 'torchvision', 'caffe'.")
  if config.input.normalization == 'none':
    return image
  image = image - constant(config.input.mean)
  if config.input.normalization == 'mean_std':
    image = image / constant(config.input.std)
  return image
