"""B, D and E started from a trained net A (the paper's initialisation, section 3.1).

  python -m vgg_flax.sweep --config=configs/sweeps/depth_long.py \
      --workdir=runs/sweeps/depth_long --launcher=ray      # trains net A (depth=11) first
  python -m vgg_flax.sweep --config=configs/sweeps/depth_from_net_a.py \
      --workdir=runs/sweeps/depth_from_net_a --report_dir=experiments/depth_from_net_a \
      --launcher=ray

The same 12-epoch budget as configs/sweeps/depth_long.py, every deeper net
initialised from net A of that sweep (seed 0; the paper trains one net A): its
first four conv layers and three FC layers by name, the rest fresh
(`vgg_flax.interop.transfer.net_a_dont_load`). The seeds vary the fresh layers and the
data order. Compare with depth_long's B, D and E trained from scratch.
"""

import ml_collections

from vgg_flax.interop import transfer
from vgg_flax import models
from vgg_flax import sweep

NET_A = 'runs/sweeps/depth_long/depth=11/seed0'


def _from_a(depth: int) -> tuple[str, dict]:
  model = ml_collections.ConfigDict({'variant': models.DEPTH_TO_VARIANT[depth], 'depth': depth})
  return str(depth), {'model.depth': depth, 'dont_load': transfer.net_a_dont_load(model)}


def get_config():
  config = ml_collections.ConfigDict()
  config.title = 'VGG depth on the digits, 12 epochs, B/D/E initialised from net A'
  config.base = 'configs/ablation.py'
  config.fixed = (('num_epochs', 12), ('init_from', NET_A))
  config.axes = (sweep.named_axis('depth', [_from_a(d) for d in (13, 16, 19)]),)
  config.seeds = (0, 1, 2)
  config.x_label = 'weight layers (B, D, E), from net A'
  return config
