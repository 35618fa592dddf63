"""ResNet-50 (torchvision's v1.5 layout) on the built-in digits: the baseline next to VGG-16.

  python -m vgg_flax.train --config=configs/resnet50.py --workdir=runs/resnet50_digits

The data settings are configs/default.py's; the optimiser is not. AdamW at
3e-4 to 1e-3 leaves ResNet-50 under 40% after 5-10 epochs here, and SGD at 0.1
spikes; SGD with momentum at 0.02, L2 5e-4 and a cosine decay reaches 96% in
10 epochs (95% with --config.model.width=16, a 5x faster run). The first
evaluations are near chance: BatchNorm's running statistics lag the weights.
"""

import importlib.util
import os

# Config files are loaded by path, not as a package: import the sibling by path.
_spec = importlib.util.spec_from_file_location(
    'default', os.path.join(os.path.dirname(os.path.abspath(__file__)), 'default.py'))
default = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(default)


def get_config():
  config = default.get_config()  # The digits and their preprocessing.
  config.model.name = 'resnet50'  # Reads model.width, conv_impl, dtype; no dropout.
  config.num_epochs = 10
  config.optimizer = 'sgd'
  config.learning_rate = 0.02
  config.momentum = 0.9
  config.weight_decay = 5e-4
  config.schedule.name = 'cosine'
  config.schedule.warmup_epochs = 1.0
  return config
