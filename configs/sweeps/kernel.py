"""Kernel size: column B with 3x3, 5x5 and 7x7 convs, and B-5x5, 3 seeds.

  python -m vgg_flax.sweep --config=configs/sweeps/kernel.py --workdir=runs/sweeps/kernel \
      --report_dir=experiments/kernel

B stacks two convs per block. '2x 3x3' against '1x 5x5' (B-5x5, paper section
4.1) compares the same receptive field with one non-linearity fewer; 5x5 and 7x7
stacks grow the receptive field and the cost. Base: configs/ablation.py.
"""

import ml_collections

from vgg_flax import sweep


def get_config():
  config = ml_collections.ConfigDict()
  config.title = 'Kernel size on the digits (configs/ablation.py, column B)'
  config.base = 'configs/ablation.py'
  config.fixed = (('model.variant', 'B'),)
  config.axes = (sweep.named_axis('convs per block', (
      ('2x 3x3 (B)', {'model.kernel_size': 3}),
      ('2x 5x5', {'model.kernel_size': 5}),
      ('2x 7x7', {'model.kernel_size': 7}),
      ('1x 5x5 (B-5x5)', {'model.variant': 'B-5x5'}),
  )),)
  config.seeds = (0, 1, 2)
  config.x_label = 'convolutions per block'
  return config
