"""The trainer's own step compiled for a TPU slice or GPUs on this host: does it fit, how fast.

  pip install -e '.[tpu]'       # libtpu: its compile-only client needs no TPU
  pip install -e '.[gpu-aot]'   # JAX's CUDA plugin and ptxas: they need no GPU
  python -m vgg_flax.aot --config=configs/vgg16.py --topology=v5e:4x4 --json=aot.json
  python -m vgg_flax.aot --config=configs/vgg16.py --topology=h100:8 --config.model.dtype=bfloat16

`vgg_flax.training.topologies` describes the devices of any TPU slice or GPU
host; `vgg_flax.training.step.make_train_step` (the function, optimiser, dtype,
shardings and donation `vgg_flax.train` runs) is lowered over a 1-D `data` mesh
of them, on shape-only state and batch, and compiled by the real TPU or GPU
compiler. Its memory analysis says whether the step fits each device, XLA's
cost analysis how many FLOPs it does, and on GPUs its text whether the
convolutions are cuDNN's; nothing is allocated and nothing runs. When the step
does not fit, at most three more compiles find the largest per-device batch
that does (`largest_batch`). Each compile is announced as it starts and ends.
The workflow of MaxText's `train_compile.py`.

Exit status: 0 when the step fits, 1 when it does not, 2 on bad input.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from typing import Callable

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
from ml_collections import config_flags

from vgg_flax import config as config_lib
from vgg_flax.models import flops
from vgg_flax.runtime import cli
from vgg_flax.training import step as step_lib
from vgg_flax.training import topologies

GiB = 2**30
# Classes, channels and training examples of the datasets a config may name,
# so that nothing is read; --num_classes/--channels cover any other.
DATASETS = {
    'imagenet2012': (1000, 3, 1_281_167),
    'cifar10': (10, 3, 50_000),
    'cifar100': (100, 3, 50_000),
    'digits': (10, 1, 1_797),
}
UsageError = topologies.UsageError
OutOfMemory = topologies.OutOfMemory


@dataclasses.dataclass
class StepMemory:
  """Per device (a TPU chip, a GPU), in bytes, and the compile of one per-device batch size."""
  per_chip_batch: int
  state: int  # Parameters, optimiser state, BatchNorm statistics (replicated).
  batch: int
  temporaries: int
  peak: int  # Arguments + outputs - donated (aliased) + temporaries.
  flops_per_chip: float  # XLA's count.
  compile_s: float
  lowered_convolutions: int = 0  # Convolutions of the lowered step (none: matmul lowerings).
  cudnn_convolutions: dict[str, int] | None = None  # GPU: cuDNN's calls, by kind.


def create_mesh(devices: list[jax.Device]) -> jax.sharding.Mesh:
  """The trainer's 1-D `data` mesh (`step.create_mesh`), over `devices`."""
  return jax.make_mesh((len(devices),), ('data',), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices)


def dataset_shape(config: ml_collections.ConfigDict, num_classes: int | None,
                  channels: int | None) -> tuple[int, int, int]:
  """(classes, channels, training examples) of `config.dataset`, without reading it."""
  known = DATASETS.get(config.dataset)
  if known is None and not (num_classes and channels):
    raise UsageError(f'config.dataset={config.dataset!r} is not one of {sorted(DATASETS)}; '
                     'give --num_classes and --channels.')
  classes, chans, examples = known or (num_classes, channels, 1_281_167)
  return (num_classes or config.model.num_classes or classes, channels or chans, examples)


class StepCompiler:
  """Compiles `step_lib.make_train_step(config)` over `mesh` for any per-device batch."""

  def __init__(self, config: ml_collections.ConfigDict, topology: topologies.Topology,
               mesh: jax.sharding.Mesh, available: int, num_classes: int, channels: int,
               train_examples: int):
    self.config, self.topology, self.mesh, self.channels = config, topology, mesh, channels
    self.available, self.chips, self.compiles = available, mesh.devices.size, 0
    self.replicated = NamedSharding(mesh, P())
    self.data_sharding = NamedSharding(mesh, P('data'))
    steps_per_epoch = max(1, train_examples // config.batch_size)  # Only the schedule uses it.
    self.model, tx, lr_fn = step_lib.create_model_and_optimizer(config, num_classes,
                                                             steps_per_epoch)
    self.state = step_lib.abstract_train_state(self.model, tx, config, channels, self.replicated)
    # Per device: the whole state when replicated, its shards with state_sharding='fsdp'.
    self.state_bytes = sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
                           for x in jax.tree.leaves(self.state))
    self.step = step_lib.make_train_step(config, lr_fn, mesh, step_lib.shardings_of(self.state))

  def batch(self, per_chip_batch: int) -> dict[str, jax.ShapeDtypeStruct]:
    b, s = per_chip_batch * self.chips, self.config.image_size
    # As the trainer feeds it: float32, or uint8 normalised inside the step.
    dtype = jnp.uint8 if self.config.input.uint8_transfer else jnp.float32
    return {'image': jax.ShapeDtypeStruct((b, s, s, self.channels), dtype,
                                          sharding=self.data_sharding),
            'label': jax.ShapeDtypeStruct((b,), jnp.int32, sharding=self.data_sharding)}

  def __call__(self, per_chip_batch: int) -> StepMemory:
    """Compiles at `per_chip_batch`, announcing it on stdout; raises OutOfMemory
    (arguments + temporaries) when it does not fit."""
    self.compiles += 1
    tag, unit, start = f'compile {self.compiles}:', self.topology.unit, time.perf_counter()
    print(f'{tag} batch {per_chip_batch * self.chips} ({per_chip_batch} per {unit}) for '
          f'{self.topology.name} ...', flush=True)
    batch = self.batch(per_chip_batch)
    batch_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(batch)) // self.chips
    lowered = self.step.lower(self.state, batch)
    try:
      compiled = topologies.compile_lowered(lowered, self.topology)
    except OutOfMemory as e:  # libtpu names the temporaries alone: add the arguments.
      e.needed += self.state_bytes + batch_bytes
      self._done(tag, start, e.needed, fits=False)
      raise
    mem = compiled.memory_analysis()
    peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
            + mem.temp_size_in_bytes)
    seconds = self._done(tag, start, peak, fits=peak <= self.available)
    if peak > self.available:  # The GPU compiler does not check; JAX's allocator would.
      raise OutOfMemory(peak, self.available, f'compiled peak {peak / GiB:.2f} GiB per {unit} '
                        f'> {self.available / GiB:.2f} GiB')
    if self.topology.platform == 'cuda':  # No cost analysis of a deviceless executable.
      flops_per_chip = topologies.lowered_flops(lowered) / self.chips
      cudnn = topologies.cudnn_convolutions(compiled.as_text())
    else:
      cost = compiled.cost_analysis()
      cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # Older jax: one per device.
      flops_per_chip, cudnn = float(cost['flops']), None
    return StepMemory(
        per_chip_batch=per_chip_batch, state=self.state_bytes, batch=batch_bytes,
        temporaries=mem.temp_size_in_bytes, peak=peak, flops_per_chip=flops_per_chip,
        compile_s=seconds, cudnn_convolutions=cudnn,
        lowered_convolutions=lowered.as_text().count('stablehlo.convolution'))

  def _done(self, tag: str, start: float, needed: float, fits: bool) -> float:
    seconds = time.perf_counter() - start
    print(f'{tag} {seconds:.1f} s: {needed / GiB:.2f} GiB per {self.topology.unit} of '
          f'{self.available / GiB:.2f} GiB, {"fits" if fits else "does not fit"}.', flush=True)
    return seconds


def largest_batch(compile_at: Callable[[int], StepMemory], failed: int, needed: float,
                  available: float, state_bytes: int, max_compiles: int = 3) -> tuple[int, bool]:
  """The largest per-device batch below `failed` that fits, in at most `max_compiles`.

  Memory is close to linear in the batch: each probe is where the line through
  the largest size known to fit (at first batch 0: the state alone) and the
  smallest known not to meets `available`; after a probe that did not fit, no
  more than halfway between them (libtpu states a refused step's need after
  its rematerialisation, below the real one). When the line says the largest
  that fits is found, one compile at one image more confirms it.

  Returns:
    (batch, exact): exact when batch + 1 is known not to fit; batch 0 when none
    tried fits (exact: not even one).
  """
  if state_bytes >= available:
    return 0, True
  lo, lo_bytes, hi, hi_bytes = 0, float(state_bytes), failed, float(needed)

  def predicted() -> int:  # Where the line through (lo, hi) meets `available`, inside them.
    slope = (hi_bytes - lo_bytes) / (hi - lo)
    line = lo + math.floor((available - lo_bytes) / slope) if slope > 0 else hi
    return min(max(line, lo + 1), hi - 1)

  last_failed = confirming = False
  for _ in range(max_compiles):
    if hi - lo <= 1:
      break
    probe = min(predicted(), (lo + hi) // 2) if last_failed else predicted()
    try:
      peak = float(compile_at(probe).peak)
    except OutOfMemory as e:
      hi, hi_bytes, last_failed = probe, e.needed, True
      continue
    if confirming:  # One image more fits too: the line was pessimistic.
      return probe, False
    lo, lo_bytes, last_failed = probe, peak, False
    confirming = hi - lo > 1 and predicted() == lo + 1
  return lo, hi - lo <= 1


def analyse(config: ml_collections.ConfigDict, topology: str, *, num_classes: int | None = None,
            channels: int | None = None, mfu: float = 0.5, search: bool = True) -> dict:
  """Compiles the step of `config` for `topology`; the figures `--json` writes.

  Per-device figures keep their TPU names (`chips`, `*_per_chip`) on GPUs too.

  Raises:
    UsageError: unknown topology, a batch that does not divide over the devices,
      an invalid config, or libtpu / the CUDA plugin missing; before any compile.
  """
  target = topologies.parse(topology)
  if not 0 < mfu <= 1:
    raise UsageError(f'--mfu={mfu}: must be in (0, 1].')
  try:
    config_lib.validate(config)
  except ValueError as e:
    raise UsageError(str(e)) from None
  num_classes, channels, examples = dataset_shape(config, num_classes, channels)
  chips, unit = target.num_devices, target.unit
  if config.batch_size % chips:
    raise UsageError(f'--config.batch_size={config.batch_size} does not divide over the '
                     f'{chips} {unit}s of {topology}; use a multiple of {chips}.')
  topologies.compiler_options(target)  # Refuses now if the GPU compiler would later.
  devices = topologies.devices(target)
  mesh = create_mesh(devices)
  hbm, hbm_source = topologies.device_memory(target, mesh)
  compile_at = StepCompiler(config, target, mesh, hbm, num_classes, channels, examples)
  per_chip = config.batch_size // chips
  flops_per_image = flops.train_flops(compile_at.model, config.image_size, channels)
  peak_flops, _ = flops.device_peak_flops(devices[0], compute_dtype=config.model.dtype)
  images_per_sec_at_peak = chips * peak_flops / flops_per_image
  result = {
      'topology': topology, 'platform': target.platform, 'unit': unit,
      'device_kind': devices[0].device_kind, 'chips': chips,
      'hosts': len({d.process_index for d in devices}), 'batch_size': config.batch_size,
      'per_chip_batch': per_chip, 'image_size': config.image_size,
      'model': f'{config.model.name}{config.model.depth if config.model.name == "vgg" else ""}',
      'dtype': config.model.dtype, 'conv_impl': config.model.conv_impl,
      'hbm_bytes_per_chip': hbm, 'hbm_source': hbm_source,
      'analytic_flops_per_step': float(flops_per_image * config.batch_size),
      'peak_flops_per_chip': peak_flops, 'mfu': mfu,
      'images_per_sec_at_peak': images_per_sec_at_peak,
      'images_per_sec_at_mfu': mfu * images_per_sec_at_peak,
      'step_seconds_at_peak': config.batch_size / images_per_sec_at_peak,
      'step_seconds_at_mfu': config.batch_size / (mfu * images_per_sec_at_peak),
  }
  try:
    memory = compile_at(per_chip)
  except OutOfMemory as e:
    result.update(fits=False, bytes_per_chip=int(e.needed), compiler_error=str(e),
                  state_bytes_per_chip=compile_at.state_bytes)
    if search:
      best, exact = largest_batch(compile_at, per_chip, e.needed, hbm, compile_at.state_bytes)
      result.update(largest_per_chip_batch=best, largest_batch_exact=exact)
    result['compiles'] = compile_at.compiles
    return result
  conv_layers = len(flops.conv_layers(compile_at.model, config.image_size, channels))
  cudnn = memory.cudnn_convolutions
  result.update(
      fits=True, bytes_per_chip=memory.peak, state_bytes_per_chip=memory.state,
      batch_bytes_per_chip=memory.batch, temp_bytes_per_chip=memory.temporaries,
      flops_per_step=memory.flops_per_chip * chips, compile_seconds=memory.compile_s,
      flops_source='compiled' if cudnn is None else 'lowered',
      conv_layers=conv_layers, lowered_convolutions=memory.lowered_convolutions,
      # Every layer a convolution (not Winograd's or im2col's matmuls), each one cuDNN's.
      native_convolutions=memory.lowered_convolutions >= conv_layers and (
          cudnn is None or sum(cudnn.values()) == memory.lowered_convolutions),
      compiles=compile_at.compiles)
  if cudnn is not None:
    result['cudnn_convolutions'] = cudnn
  return result


def summary(r: dict) -> str:
  """The report a user reads."""
  gib = lambda b: f'{b / GiB:.2f} GiB'
  unit = r['unit']
  lines = [f'{r["model"]} ({r["dtype"]}, conv {r["conv_impl"]}), batch {r["batch_size"]} '
           f'({r["per_chip_batch"]} per {unit}) at {r["image_size"]} px on {r["topology"]}: '
           f'{r["chips"]} x {r["device_kind"]}, {r["hosts"]} host(s).',
           f'HBM per {unit} ({r["hbm_source"]}): {gib(r["hbm_bytes_per_chip"])}']
  if r['fits']:
    source = 'XLA' if r['flops_source'] == 'compiled' else 'XLA, of the lowered step'
    lines += [
        f'Per {unit}:',
        f'  parameters + optimiser state  {gib(r["state_bytes_per_chip"])}',
        f'  batch                         {gib(r["batch_bytes_per_chip"])}',
        f'  temporaries                   {gib(r["temp_bytes_per_chip"])}',
        f'  peak                          {gib(r["bytes_per_chip"])} of '
        f'{gib(r["hbm_bytes_per_chip"])} '
        f'({r["bytes_per_chip"] / r["hbm_bytes_per_chip"]:.0%})',
        f'FLOPs per step: {r["flops_per_step"]:.4g} ({source}), '
        f'{r["analytic_flops_per_step"]:.4g} (analytic, vgg_flax.models.flops; XLA/analytic = '
        f'{r["flops_per_step"] / r["analytic_flops_per_step"]:.3f})',
        _convolutions(r),
        f'Compiled in {r["compile_seconds"]:.1f} s.']
  lines += [
      f'At the datasheet peak ({r["peak_flops_per_chip"] / 1e12:.0f} TFLOP/s per {unit}): '
      f'{r["step_seconds_at_peak"] * 1e3:.1f} ms per step, '
      f'{r["images_per_sec_at_peak"]:,.0f} images/s.',
      f'At {r["mfu"]:.0%} MFU: {r["step_seconds_at_mfu"] * 1e3:.1f} ms per step, '
      f'{r["images_per_sec_at_mfu"]:,.0f} images/s.']
  if r['fits']:
    lines.append(f'FITS: {gib(r["bytes_per_chip"])} of {gib(r["hbm_bytes_per_chip"])} HBM '
                 f'per {unit}.')
  else:
    line = (f'DOES NOT FIT: needs about {gib(r["bytes_per_chip"])} of HBM per {unit}, '
            f'{gib(r["hbm_bytes_per_chip"])} available ({r["compiler_error"]}).')
    if 'largest_per_chip_batch' in r:
      best, exact = r['largest_per_chip_batch'], r['largest_batch_exact']
      if best:
        line += (f' The largest per-{unit} batch that fits is {best}'
                 f'{"" if exact else " or more"}: '
                 f'--config.batch_size={best * r["chips"]}.')
      else:
        line += (f' Not even one image per {unit} fits.' if exact else
                 ' None of the smaller batches tried fits.')
    lines.append(line + f' ({r["compiles"]} compiles.)')
  return '\n'.join(lines)


def _convolutions(r: dict) -> str:
  """Whether every conv layer is the platform's own convolution (cuDNN's on GPUs)."""
  verdict = 'native' if r['native_convolutions'] else (
      'NOT native: matmuls (Winograd or patches) stand in for convolutions')
  calls = r.get('cudnn_convolutions')
  if calls is None:
    return (f'Convolutions: {r["lowered_convolutions"]} in the step for {r["conv_layers"]} '
            f'conv layers: {verdict}.')
  kinds = ', '.join(f'{k} {n}' for k, n in sorted(calls.items()))
  return (f'Convolutions: {sum(calls.values())} cuDNN calls ({kinds or "none"}) of '
          f'{r["lowered_convolutions"]} in the step, for {r["conv_layers"]} conv layers: '
          f'{verdict}.')


def define_flags() -> None:
  config_flags.DEFINE_config_file(
      'config', None, 'Config file (configs/*.py); override fields with --config.FIELD=VALUE.',
      lock_config=True)
  flags.mark_flag_as_required('config')
  flags.DEFINE_string('topology', None, f'What to compile for: {topologies.allowed()}.',
                      required=True)
  flags.DEFINE_float('mfu', 0.5, 'Model FLOPs utilisation for the throughput estimate.')
  flags.DEFINE_integer('num_classes', None, 'Default: config.model.num_classes, else the '
                       "config's dataset (imagenet2012: 1000).")
  flags.DEFINE_integer('channels', None, "Image channels; default: the config's dataset.")
  flags.DEFINE_bool('search', True, 'When the step does not fit, find the largest per-device '
                    'batch that does in at most 3 more compiles, each about as long as the '
                    'first: memory is close to linear in the batch, so a line through two '
                    'compiled sizes predicts it, and a compile at one image more confirms it '
                    '(after a size that does not fit, the next goes at most halfway down).')
  flags.DEFINE_string('json', None, 'Write the figures to this JSON file.')


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  # Compile-only: this process runs nothing on a TPU or GPU, so it never opens one;
  # JAX's CUDA plugin registers only then.
  jax.config.update('jax_platforms', 'cpu')
  f = flags.FLAGS
  try:
    result = analyse(f.config, f.topology, num_classes=f.num_classes, channels=f.channels,
                     mfu=f.mfu, search=f.search)
  except UsageError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(summary(result))
  if f.json:
    with open(f.json, 'w') as out:
      json.dump(result, out, indent=2)
  return 0 if result['fits'] else 1


if __name__ == '__main__':
  cli.run(main, define_flags)
