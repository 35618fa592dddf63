"""TensorFlow (only tf.data is used), imported without its C++ start-up notices.

  from vgg_flax.quiet_tf import tf  # Instead of `import tensorflow as tf`.
"""

from vgg_flax import quiet

tf = quiet.import_tensorflow()
