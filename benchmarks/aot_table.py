"""The fit table of benchmarks/README.md: VGG-11/16/19 at the paper's batch on GPUs and TPU
slices, compiled on this CPU host by `vgg_flax.aot`, and the levers that make a step fit.

  python benchmarks/aot_table.py --json=benchmarks/aot_table.json [--models=16 --topologies=h100:1]

For each model, dtype and topology: one compile at batch 256 (224 px, SGD
momentum, 1000 classes). A step that does not fit is compiled again with the
levers, in this order, until one fits: state_sharding='fsdp' (several devices),
then model.remat='layer', then grad_accum_steps 2, 4, 8 with it.
"""

import argparse
import json
import os
import sys
import time

from vgg_flax import aot
from vgg_flax import config as config_lib
from vgg_flax.io import run_config

LEVERS = ({'state_sharding': 'fsdp'}, {'model.remat': 'layer'},
          {'model.remat': 'layer', 'grad_accum_steps': 2},
          {'model.remat': 'layer', 'grad_accum_steps': 4},
          {'model.remat': 'layer', 'grad_accum_steps': 8})


def _config(depth: int, dtype: str, levers: dict):
  config = config_lib.get_base_config()
  config.model.depth, config.model.dtype = depth, dtype
  return run_config.apply_overrides(config, levers)


def row(depth: int, dtype: str, topology: str) -> dict:
  """The first of (no lever, LEVERS...) with which the step fits, and its figures."""
  chips = None
  for levers in ({},) + LEVERS:
    if levers.get('state_sharding') and chips == 1:
      continue
    start = time.perf_counter()
    r = aot.analyse(_config(depth, dtype, levers), topology, num_classes=1000, channels=3,
                    search=False)
    chips = r['chips']
    r.update(model=f'vgg{depth}', dtype=dtype, topology=topology, levers=levers,
             wall_seconds=time.perf_counter() - start)
    print(json.dumps({k: r[k] for k in ('model', 'dtype', 'topology', 'levers', 'fits',
                                        'bytes_per_chip', 'wall_seconds')}), flush=True)
    if r['fits']:
      return r
  return r


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--models', default='11,16,19')
  parser.add_argument('--dtypes', default='float32,bfloat16')
  parser.add_argument('--topologies', default='v100:1,a100-40:1,h100:1,h100:8,v5e:2x2,v5e:4x4')
  parser.add_argument('--json', default=None)
  args = parser.parse_args()
  rows = []
  for topology in args.topologies.split(','):
    for depth in map(int, args.models.split(',')):
      for dtype in args.dtypes.split(','):
        rows.append(row(depth, dtype, topology))
        if args.json:  # After each row: a long run keeps what it has.
          with open(args.json, 'w') as f:
            json.dump(rows, f, indent=1, default=str)


if __name__ == '__main__':
  sys.exit(main())
