"""vgg_flax: VGG networks in JAX/Flax, from a laptop CPU to a TPU pod."""

import os

# TensorFlow serves only tf.data here; keep its C++ start-up chatter out of the logs.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
