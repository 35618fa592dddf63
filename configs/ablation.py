"""A small VGG on the built-in digits: the base of the ablation sweeps.

  python -m vgg_flax.train --config=configs/ablation.py --workdir=runs/ablation \
      --config.model.depth=19

configs/default.py at a quarter of the width (16 channels in block 1, 256-wide
FC layers), so that a run takes about a minute on two CPU cores and a sweep of
a dozen runs fits in a coffee break. At this width the step size can be ten
times larger (AdamW 1e-3), and five epochs leave accuracy short of its ceiling
(96-97% for VGG-19), where differences between models can still show.
"""

import importlib.util
import os

# Config files are loaded by path, not as a package: import the sibling by path.
_spec = importlib.util.spec_from_file_location(
    'default', os.path.join(os.path.dirname(os.path.abspath(__file__)), 'default.py'))
default = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(default)


def get_config():
  config = default.get_config()
  config.model.width = 16
  config.model.fc_dim = 256
  config.learning_rate = 1e-3
  config.num_epochs = 5
  config.checkpoint.keep = 1
  return config
