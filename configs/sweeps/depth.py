"""Depth: the paper's columns A, B, D, E (11, 13, 16, 19 weight layers), 3 seeds.

  python -m vgg_flax.sweep --config=configs/sweeps/depth.py --workdir=runs/sweeps/depth \
      --report_dir=experiments/depth

Every run is configs/ablation.py (BatchNorm, 16 channels in block 1, 5 epochs on
the built-in digits) with only the depth changed. About 15 minutes on 2 CPU cores.
"""

import ml_collections

from vgg_flax import sweep


def get_config():
  config = ml_collections.ConfigDict()
  config.title = 'VGG depth on the digits (configs/ablation.py)'
  config.base = 'configs/ablation.py'
  config.fixed = ()
  config.axes = (sweep.axis('depth', 'model.depth', (11, 13, 16, 19)),)
  config.seeds = (0, 1, 2)
  config.x_label = 'weight layers (A, B, D, E)'
  return config
