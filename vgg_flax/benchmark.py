"""Train-step speed of vgg_flax, against PyTorch's VGG in the same run.

  python -m vgg_flax.benchmark --depths=16 --workloads=32x128,224x8 --torch \
      --json=benchmarks/results.json

For each model and (image size, batch) it times the product's own step
(`vgg_flax.training.step.make_train_step`, jitted over the mesh with the state donated, built by
`step.create_train_state` and `step.create_model_and_optimizer`; SGD with momentum
unless told otherwise) and reports images/s, model GFLOP/s from the analytic
count (`vgg_flax.models.flops`), MFU against the device's peak (datasheet for known
GPUs/TPUs, a measured matmul on the CPU), the compile time, and the compiled
step's peak memory. With --torch it times torchvision's VGG
(`benchmarks/torch_peer.py`, same batch, same optimiser) in alternating rounds
and prints the vgg_flax/PyTorch ratio of the medians: against PyTorch float32
(NCHW) for --dtype=float32, and against its best CPU mode, bf16 autocast with
channels_last model and input, for --dtype=bfloat16. The header names the
CPU's matrix features (AVX-512 BF16, AMX), on which bf16 speed depends.

  python -m vgg_flax.benchmark --pipeline [--pipeline_cores=1,2] [--json=FILE]

is its own mode: the host input pipeline (`input_pipeline.train_batches` with
configs/vgg16.py's augmentation) on generated photo-sized JPEGs, in images/s
per host core (`benchmarks/pipeline.py`); no train step.

Results go to a table on stdout and, with --json, to a JSON file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from vgg_flax import config as config_lib
from vgg_flax import models
from vgg_flax.models import flops
from vgg_flax.runtime import cli
from vgg_flax.runtime import cpu
from vgg_flax.training import step as step_lib

_BENCHMARKS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               'benchmarks')


def make_config(depth: int, image_size: int, batch_size: int, *, conv_impl: str = 'auto',
                dtype: str = 'float32', optimizer: str = 'sgd', batch_norm: bool = False,
                width: int = 64, fc_dim: int = 4096, base=None):
  """The base config (or `base`) set to one benchmark workload."""
  config = base.copy_and_resolve_references() if base is not None else (
      config_lib.get_base_config())
  config.model.depth = depth
  config.model.conv_impl = conv_impl
  config.model.dtype = dtype
  config.model.batch_norm = batch_norm
  config.model.width = width
  config.model.fc_dim = fc_dim
  config.image_size = image_size
  config.batch_size = batch_size
  config.optimizer = optimizer
  config.schedule.name = 'constant' if config.schedule.name == 'plateau' else (
      config.schedule.name)
  return config


class FlaxStep:
  """The product's train step, compiled once for one workload, on random data."""

  def __init__(self, config, *, num_classes: int = 1000, channels: int = 3,
               steps_per_epoch: int = 100):
    self.config = config
    mesh = step_lib.create_mesh()
    replicated, data = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))
    self.model, tx, lr_fn = step_lib.create_model_and_optimizer(config, num_classes,
                                                             steps_per_epoch)
    self.state = step_lib.create_train_state(self.model, tx, config, channels, replicated)
    self.jitted = step_lib.make_train_step(config, lr_fn, mesh, step_lib.shardings_of(self.state))
    rng = np.random.default_rng(config.seed)
    n, s = config.batch_size, config.image_size
    self.batch = {
        'image': jax.device_put(rng.standard_normal((n, s, s, channels), np.float32), data),
        'label': jax.device_put(rng.integers(0, num_classes, n).astype(np.int32), data)}
    self.flops_per_image = flops.train_flops(self.model, s, channels)
    self.batch_size = n
    self.compile_s = None
    self.memory_bytes = None

  def compile(self) -> float:
    """Compiles the step (timed) and runs it once; returns the compile seconds."""
    start = time.perf_counter()
    compiled = self.jitted.lower(self.state, self.batch).compile()
    self.compile_s = time.perf_counter() - start
    mem = compiled.memory_analysis()
    if mem is not None:  # Arguments + outputs + temporaries, less donated aliases.
      self.memory_bytes = int(mem.argument_size_in_bytes + mem.output_size_in_bytes
                              + mem.temp_size_in_bytes - mem.alias_size_in_bytes)
    self.run(1)  # Through the jit cache, which now compiles from the warm cache.
    return self.compile_s

  def run(self, steps: int) -> float:
    """Seconds for `steps` steps, synchronising only after the last one."""
    start = time.perf_counter()
    metrics = None
    for _ in range(steps):
      self.state, metrics = self.jitted(self.state, self.batch)
    jax.block_until_ready(metrics)
    return time.perf_counter() - start


def _median_rate(batch: int, steps: int, seconds: list[float]) -> float:
  return batch * steps / float(np.median(seconds))


def bench_workload(depth: int, image_size: int, batch_size: int, *, steps: int, rounds: int,
                   peak: float, with_torch: bool, conv_impl: str = 'auto',
                   dtype: str = 'float32', optimizer: str = 'sgd', batch_norm: bool = False,
                   width: int = 64, fc_dim: int = 4096, num_classes: int = 1000,
                   channels: int = 3) -> dict[str, Any]:
  """Times one (model, size, batch), alternating with PyTorch when asked."""
  config = make_config(depth, image_size, batch_size, conv_impl=conv_impl, dtype=dtype,
                       optimizer=optimizer, batch_norm=batch_norm, width=width, fc_dim=fc_dim)
  rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  step = FlaxStep(config, num_classes=num_classes, channels=channels)
  step.compile()
  peer = None
  if with_torch:
    sys.path.insert(0, _BENCHMARKS_DIR)
    import torch_peer  # pylint: disable=g-import-not-at-top
    peer = torch_peer.TorchStep(depth, image_size, batch_size, in_channels=channels,
                                num_classes=num_classes, batch_norm=batch_norm,
                                lr=config.learning_rate, momentum=config.momentum,
                                weight_decay=config.weight_decay, bf16=dtype == 'bfloat16',
                                width=width, fc_dim=fc_dim)
    torch_mode = (f"{'bf16 autocast' if peer.bf16 else 'float32'}, "
                  f"{'channels_last' if peer.channels_last else 'NCHW'}")
    peer()  # Warm-up: allocations, oneDNN kernel selection.
  flax_s, torch_s = [], []
  for _ in range(rounds):  # Alternate, so both see the same machine load.
    flax_s.append(step.run(steps))
    if peer is not None:
      torch_s.append(sum(peer.time_steps(steps)))
  rate = _median_rate(batch_size, steps, flax_s)
  result = {
      'model': f'vgg{depth}', 'image_size': image_size, 'batch_size': batch_size,
      'conv_impl': conv_impl, 'dtype': dtype, 'optimizer': optimizer,
      'batch_norm': batch_norm, 'width': width, 'steps': steps, 'rounds': rounds,
      'images_per_sec': rate, 'round_images_per_sec': [batch_size * steps / t for t in flax_s],
      'gflops_per_image': step.flops_per_image / 1e9,
      'model_gflops_per_sec': rate * step.flops_per_image / 1e9,
      # `rate` is over every device: against all their peaks, not one's.
      'mfu': flops.mfu(rate, step.flops_per_image, peak * jax.device_count()),
      'compile_s': step.compile_s,
      'step_memory_mb': None if step.memory_bytes is None else step.memory_bytes / 2**20,
      'max_rss_growth_mb': (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024,
      'recompiled': step.jitted._cache_size() != 1,  # pylint: disable=protected-access
  }
  if peer is not None:
    torch_rate = _median_rate(batch_size, steps, torch_s)
    result.update({
        'torch_mode': torch_mode,
        'torch_images_per_sec': torch_rate,
        'torch_round_images_per_sec': [batch_size * steps / t for t in torch_s],
        'torch_model_gflops_per_sec': torch_rate * step.flops_per_image / 1e9,
        'ratio_vs_torch': rate / torch_rate,
        # Ratio of each alternating pair, whose median is less load-sensitive.
        'pair_ratio_median': float(np.median([t / f for f, t in zip(flax_s, torch_s)])),
    })
  return result


def format_table(results: list[dict[str, Any]]) -> str:
  """The results as a Markdown table."""
  head = ('| model | px | batch | impl | dtype | img/s | GFLOP/s | MFU | compile s '
          '| step MB | torch img/s | ratio |')
  lines = [head, '|' + '---|' * (head.count('|') - 1)]
  for r in results:
    torch_rate = r.get('torch_images_per_sec')
    torch_cols = ('| |' if torch_rate is None else
                  f"| {torch_rate:.1f} | {r['ratio_vs_torch']:.2f} |")
    memory = r['step_memory_mb']
    lines.append(
        f"| {r['model']} | {r['image_size']} | {r['batch_size']} | {r['conv_impl']} "
        f"| {r['dtype']} | {r['images_per_sec']:.1f} | {r['model_gflops_per_sec']:.0f} "
        f"| {r['mfu']:.0%} | {r['compile_s']:.1f} "
        f"| {'?' if memory is None else f'{memory:.0f}'} {torch_cols}")
  return '\n'.join(lines)


def _workloads(text: str) -> list[tuple[int, int]]:
  try:
    pairs = [tuple(int(v) for v in item.split('x')) for item in text.split(',')]
    if any(len(p) != 2 for p in pairs):
      raise ValueError(text)
    return pairs
  except ValueError:
    raise argparse.ArgumentTypeError(
        f'--workloads={text!r}: expected SIZExBATCH[,SIZExBATCH...], e.g. 32x128,224x8')


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = cli.ArgumentParser(prog='python -m vgg_flax.benchmark', description=__doc__,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--depths', default='16', help='Comma-separated: 11,13,16,19.')
  p.add_argument('--workloads', type=_workloads, default=_workloads('32x128,224x8'),
                 help='Image size x batch, comma-separated.')
  p.add_argument('--steps', type=int, default=3, help='Steps per timed round.')
  p.add_argument('--rounds', type=int, default=5, help='Alternating rounds; medians.')
  p.add_argument('--conv_impl', default='auto', choices=models.layers.CONV_IMPLS)
  p.add_argument('--dtype', default='float32', choices=tuple(models.DTYPES))
  p.add_argument('--optimizer', default='sgd', choices=('sgd', 'adam', 'adamw'))
  p.add_argument('--batch_norm', action='store_true')
  p.add_argument('--width', type=int, default=64, help='Block-1 channels (64 = paper).')
  p.add_argument('--fc_dim', type=int, default=4096)
  p.add_argument('--num_classes', type=int, default=1000)
  p.add_argument('--channels', type=int, default=3)
  p.add_argument('--torch', action='store_true', help='Time the PyTorch peer too.')
  p.add_argument('--pipeline', action='store_true',
                 help='Instead: time the host input pipeline on photo-sized JPEGs.')
  p.add_argument('--pipeline_cores', default=f'1,{len(os.sched_getaffinity(0))}',
                 help='--pipeline: the core counts to pin tf.data to, comma-separated.')
  p.add_argument('--pipeline_images', type=int, default=384,
                 help='--pipeline: how many 500x375 JPEGs to generate.')
  p.add_argument('--json', default='', help='Write the results to this file.')
  return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
  """Runs the benchmark of `args`; returns what --json writes."""
  device = jax.local_devices()[0]
  peak, peak_source = flops.device_peak_flops(device)
  out: dict[str, Any] = {
      'machine': {'backend': jax.default_backend(), 'device_kind': device.device_kind,
                  'device_count': jax.device_count(), 'cpu_count': os.cpu_count(),
                  'processor': platform.processor() or platform.machine(),
                  'cpu_model': cpu.model_name(),
                  'cpu_matrix_features': sorted(cpu.matrix_features()),
                  'load_average': os.getloadavg(), 'jax': jax.__version__,
                  'xla_flags': os.environ.get('XLA_FLAGS', '')},
      'peak_flops': peak, 'peak_source': peak_source, 'results': []}
  for depth in (int(d) for d in args.depths.split(',')):
    for size, batch in args.workloads:
      r = bench_workload(depth, size, batch, steps=args.steps, rounds=args.rounds, peak=peak,
                         with_torch=args.torch, conv_impl=args.conv_impl, dtype=args.dtype,
                         optimizer=args.optimizer, batch_norm=args.batch_norm,
                         width=args.width, fc_dim=args.fc_dim,
                         num_classes=args.num_classes, channels=args.channels)
      out['results'].append(r)
      print(format_table([r]).splitlines()[-1], flush=True)
  out['machine']['load_average_end'] = os.getloadavg()
  if args.torch:
    import torch_peer  # pylint: disable=g-import-not-at-top
    out['machine'].update(torch=torch_peer.version(), torch_threads=torch_peer.num_threads())
  return out


def pipeline_main(args: argparse.Namespace) -> None:
  """--pipeline: the host input pipeline on photo-sized JPEGs (benchmarks/pipeline.py)."""
  sys.path.insert(0, _BENCHMARKS_DIR)
  import pipeline  # pylint: disable=g-import-not-at-top
  out = pipeline.run([int(c) for c in args.pipeline_cores.split(',')],
                     num_images=args.pipeline_images)
  print(pipeline.format_report(out))
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, 'w') as f:
      json.dump(out, f, indent=2)


def header() -> str:
  """The device, the host CPU with its matrix features, and the load."""
  features = ', '.join(sorted(cpu.matrix_features())) or 'no bf16 arithmetic'
  return (f'{jax.devices()[0].device_kind} ({jax.default_backend()}); host CPU '
          f'{cpu.model_name() or platform.machine()} ({features}); '
          f'load {os.getloadavg()[0]:.1f}')


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
  if args.pipeline:
    pipeline_main(args)
    return
  print(header(), flush=True)
  out = run(args)
  print(f"peak {out['peak_flops'] / 1e9:.0f} GFLOP/s ({out['peak_source']})")
  print(format_table(out['results']))
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, 'w') as f:
      json.dump(out, f, indent=2)


if __name__ == '__main__':
  cli.call(main)
