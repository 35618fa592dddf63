"""A deeper VGG started from a trained net A, the paper's recipe (section 3.1).

  python -m vgg_flax.train --config=configs/ablation.py --workdir=runs/net_a \
      --config.model.depth=11
  python -m vgg_flax.train --config=configs/from_net_a.py:16 --workdir=runs/d_from_a \
      --config.init_from=runs/net_a

The argument is the depth (13, 16 or 19) or a column (B, C, D, E). Net A's
first four conv layers (block1_conv1, block2_conv1, block3_conv1/2) and its
three FC layers are loaded by name; the layers A lacks and blocks 4-5 start
fresh (`vgg_flax.interop.transfer.net_a_dont_load`). The base is configs/ablation.py;
for ImageNet pass the same `dont_load` on top of configs/vgg16.py.
"""

import importlib.util
import os

from vgg_flax.interop import transfer

_spec = importlib.util.spec_from_file_location(
    'ablation', os.path.join(os.path.dirname(os.path.abspath(__file__)), 'ablation.py'))
ablation = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ablation)


def get_config(target: str = '16'):
  config = ablation.get_config()
  if target.isdigit():
    config.model.depth = int(target)
  else:
    config.model.variant = target
  if (config.model.variant or config.model.depth) in ('A', 'A-LRN', 11):
    raise ValueError(f'configs/from_net_a.py:{target}: expected a deeper net than A '
                     '(13, 16, 19, B, C, D or E).')
  config.init_from = ''  # Set --config.init_from to the net A workdir.
  config.dont_load = transfer.net_a_dont_load(config.model)
  return config
