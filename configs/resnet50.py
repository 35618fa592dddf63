"""ResNet-50 (torchvision's v1.5 layout) on the built-in digits: the baseline next to VGG-16.

  python -m vgg_flax.train --config=configs/resnet50.py --workdir=runs/resnet50_digits

The data settings are configs/default.py's; the optimiser is not. AdamW at
3e-4 to 1e-3 leaves ResNet-50 under 40% after 5-10 epochs here, and SGD at 0.1
spikes; SGD with momentum at 0.02, L2 5e-4 and a cosine decay reaches 96% in
10 epochs (95% with --config.model.width=16, a 5x faster run). The first
evaluations are near chance: BatchNorm's running statistics lag the weights.
"""

from vgg_flax.config import get_base_config


def get_config():
  config = get_base_config()
  config.model.name = 'resnet50'  # Reads model.width, conv_impl, dtype; no dropout.

  config.dataset = 'digits'
  config.image_size = 32
  config.input.scale_min = 32
  config.input.scale_max = 36
  config.input.flip = False  # A mirrored digit is another glyph.
  config.input.eval_resize = 32
  config.input.normalization = 'mean_std'
  config.input.mean = (77.7,)  # Measured over the 32 px digits.
  config.input.std = (82.5,)
  config.input.shuffle_buffer = 2048
  config.input.cache = True

  config.batch_size = 64
  config.num_epochs = 10
  config.optimizer = 'sgd'
  config.learning_rate = 0.02
  config.momentum = 0.9
  config.weight_decay = 5e-4
  config.schedule.name = 'cosine'
  config.schedule.warmup_epochs = 1.0

  config.log_every_steps = 11
  config.checkpoint.keep = 2
  return config
