"""vgg_flax: VGG networks in JAX/Flax, from a laptop CPU to a TPU pod."""

from vgg_flax import quiet as _quiet

# Before TensorFlow or JAX is imported: their log levels and platforms.
_quiet.configure_environment()
