"""VGG-13 with the paper's ImageNet recipe (Simonyan & Zisserman 2015, section 3.1).

  python -m vgg_flax.train --config=configs/vgg13.py --workdir=runs/vgg13 \
      --config.data_dir=/path/to/tensorflow_datasets

That one command trains S jittered in [256, 512] from scratch. The paper's own
chain of training scales is three commands, each starting from the one before:

  python -m vgg_flax.train --config=configs/vgg13.py:s256 --workdir=runs/vgg13_s256 \
      --config.data_dir=/path/to/tensorflow_datasets       # fixed S=256, lr 1e-2
  python -m vgg_flax.train --config=configs/vgg13.py:s384 --workdir=runs/vgg13_s384 \
      --config.data_dir=/path/to/tensorflow_datasets       # S=384 from runs/vgg13_s256, lr 1e-3
  python -m vgg_flax.train --config=configs/vgg13.py:multiscale --workdir=runs/vgg13_multiscale \
      --config.data_dir=/path/to/tensorflow_datasets       # S in [256, 512] from runs/vgg13_s384

(--config.init_from=DIR starts a stage from another workdir.) Every stage: SGD
with momentum 0.9, batch 256, L2 weight decay 5e-4, dropout 0.5, the rate
divided by 10 when the validation accuracy stops improving, 224 px crops with
flips and AlexNet's colour shift, evaluated densely at Q = S (384 for jittered
S) at the end. See configs/imagenet.py for the details and README's "The
paper's experiments" for what differs from the paper.
"""

import importlib.util
import os

# Config files are loaded by path, not as a package: import the sibling by path.
_spec = importlib.util.spec_from_file_location(
    'imagenet', os.path.join(os.path.dirname(os.path.abspath(__file__)), 'imagenet.py'))
imagenet = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(imagenet)


def get_config(stage: str = ''):
  """stage: '' (jittered S from scratch), 's256', 's384' or 'multiscale'."""
  return imagenet.for_depth(13, stage)
