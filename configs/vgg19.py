"""VGG-19 with the paper's ImageNet recipe (Simonyan & Zisserman 2015, section 3.1).

  python -m vgg_flax.train --config=configs/vgg19.py --workdir=runs/vgg19 \
      --config.data_dir=/path/to/tensorflow_datasets

SGD with momentum 0.9, batch 256, L2 weight decay 5e-4, dropout 0.5 on the two
FC layers, lr 1e-2 divided by 10 when the loss plateaus, 224 px crops of images
isotropically rescaled with scale jittering S in [256, 512], random flips. The
data is tfds 'imagenet2012', which needs its manual download prepared first.
"""

from vgg_flax.config import get_base_config


def get_config():
  config = get_base_config()  # The defaults are the paper's recipe.
  config.model.depth = 19
  return config
