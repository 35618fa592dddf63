"""VGG-16 with BatchNorm on CIFAR-10 (32x32 RGB), the usual small-image VGG.

  tfds build cifar10 --data_dir=$HOME/tensorflow_datasets   # once, with internet
  python -m vgg_flax.train --config=configs/cifar10.py --workdir=runs/cifar10

At 32 px the feature map after five poolings is 1x1x512, so the global-pool head
is a 512 -> 10 classifier. Augmentation: S in [32, 40] then a 32 px crop (the
rescaled cousin of pad-and-crop), random flips.
"""

from vgg_flax.config import get_base_config


def get_config():
  config = get_base_config()
  config.model.depth = 16
  config.model.batch_norm = True
  config.model.head = 'gap'
  config.model.dropout_rate = 0.3

  config.dataset = 'cifar10'
  config.image_size = 32
  config.input.scale_min = 32
  config.input.scale_max = 40
  config.input.eval_resize = 32
  config.input.normalization = 'mean_std'
  config.input.mean = (125.3, 123.0, 113.9)  # CIFAR-10 training-set statistics.
  config.input.std = (63.0, 62.1, 66.7)
  config.input.cache = True

  config.batch_size = 128
  config.num_epochs = 60
  config.optimizer = 'sgd'
  config.learning_rate = 0.05
  config.weight_decay = 5e-4
  config.schedule.name = 'cosine'
  config.schedule.warmup_epochs = 1.0
  config.log_every_steps = 100
  return config
