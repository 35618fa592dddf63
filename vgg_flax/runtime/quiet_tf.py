"""TensorFlow (only tf.data is used), imported without its C++ start-up notices.

  from vgg_flax.runtime.quiet_tf import graph_fn, tf  # Instead of `import tensorflow as tf`.

  ds = ds.map(graph_fn(prepare))
"""

from vgg_flax.runtime import quiet

tf = quiet.import_tensorflow()

# For tf.data's map and filter: the functions are traced as written, without
# AutoGraph's rewrite of their source (a second per process, at every launch).
# They branch on Python values only; a tensor condition uses tf.cond.
graph_fn = tf.autograph.experimental.do_not_convert
