"""The six columns of the paper's Table 1 (A, A-LRN, B, C, D, E), 3 seeds.

  python -m vgg_flax.sweep --config=configs/sweeps/columns.py --workdir=runs/sweeps/columns

Table 3 of the paper as an ablation: does LRN help (A vs A-LRN), do 1x1 convs
help (C vs B), do 3x3 convs beat 1x1 at the same depth (D vs C)? Base:
configs/ablation.py, so about 20 minutes on 2 CPU cores.
"""

import ml_collections

from vgg_flax import sweep


def get_config():
  config = ml_collections.ConfigDict()
  config.title = "The paper's columns on the digits (configs/ablation.py)"
  config.base = 'configs/ablation.py'
  config.fixed = ()
  config.axes = (sweep.axis('column', 'model.variant', ('A', 'A-LRN', 'B', 'C', 'D', 'E')),)
  config.seeds = (0, 1, 2)
  config.x_label = 'column of Table 1'
  return config
