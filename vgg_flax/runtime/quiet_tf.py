"""TensorFlow (only tf.data is used), imported without its C++ start-up notices.

  from vgg_flax.runtime.quiet_tf import tf  # Instead of `import tensorflow as tf`.
"""

from vgg_flax.runtime import quiet

tf = quiet.import_tensorflow()
