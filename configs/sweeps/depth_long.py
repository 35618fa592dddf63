"""Depth again (A, B, D, E), with a budget where every depth's training loss levels off.

  python -m vgg_flax.sweep --config=configs/sweeps/depth_long.py \
      --workdir=runs/sweeps/depth_long --report_dir=experiments/depth_long --launcher=ray

configs/sweeps/depth.py gave 5 epochs, and VGG-19 ended with twice VGG-11's
training loss and a test accuracy still rising. This sweep tests whether that
was under-training: 12 epochs (264 steps) instead of 5, nothing else changed.
Why a fixed budget and not early stopping: the digits have no validation
split (only train and test), and stopping on the test set would select on the
number being reported. The cosine schedule decays to zero over the budget, so
the training loss flattens by construction; metrics.jsonl shows where each
depth's loss levels off. About 35 minutes on 2 CPU cores.
"""

import ml_collections

from vgg_flax import sweep


def get_config():
  config = ml_collections.ConfigDict()
  config.title = 'VGG depth on the digits, 12 epochs (configs/ablation.py)'
  config.base = 'configs/ablation.py'
  config.fixed = (('num_epochs', 12),)
  config.axes = (sweep.axis('depth', 'model.depth', (11, 13, 16, 19)),)
  config.seeds = (0, 1, 2)
  config.x_label = 'weight layers (A, B, D, E)'
  return config
