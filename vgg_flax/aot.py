"""The trainer's own train step compiled for a TPU slice on this host: does it fit, how fast.

  pip install -e '.[tpu]'   # libtpu: its compile-only client needs no TPU
  python -m vgg_flax.aot --config=configs/vgg16.py --topology=v5e:4x4 \
      --config.model.dtype=bfloat16 --json=aot.json

libtpu describes the devices of any TPU slice (`jax.experimental.topologies`);
`vgg_flax.training.step.make_train_step` (the function, optimiser, dtype, shardings and
donation `vgg_flax.train` runs) is lowered over a 1-D `data` mesh of them, on
shape-only state and batch, and compiled by the real TPU compiler. Its memory
and cost analyses say whether the step fits each chip's HBM and how many
FLOPs it does; nothing is allocated and nothing runs. When the step does not
fit, a few more compiles find the largest per-chip batch that does. The
workflow of MaxText's `train_compile.py`.

Exit status: 0 when the step fits, 1 when it does not, 2 on bad input.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import re
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
from vgg_flax.runtime import errors
from vgg_flax.runtime import quiet
from vgg_flax.training import step as step_lib

GiB = 2**30
# Per generation: libtpu's chip configuration (v4 and v5p chips are one
# "megacore" device, as JAX shows them on a TPU VM), the topology's dimensions,
# and the datasheet HBM per chip, used only if libtpu's own figure cannot be read.
GENERATIONS = {
    'v4': ('megacore', 3, 32 * GiB),
    'v5e': ('default', 2, 16 * GiB),
    'v5p': ('megacore', 3, 95 * GiB),
    'v6e': ('default', 2, 32 * GiB),
}
# Classes, channels and training examples of the datasets a config may name,
# so that nothing is read; --num_classes/--channels cover any other.
DATASETS = {
    'imagenet2012': (1000, 3, 1_281_167),
    'cifar10': (10, 3, 50_000),
    'cifar100': (100, 3, 50_000),
    'digits': (10, 1, 1_797),
}
_OOM = re.compile(r'RESOURCE_EXHAUSTED.*?\(([\d.]+)([KMGT]?)\)[^()]*available HBM \(([\d.]+)([KMGT]?)\)',
                  re.S)


class UsageError(errors.UsageError):
  """Bad input: reported in one line, before anything is compiled."""


class OutOfMemory(Exception):
  """The compiler refused the step: `needed` bytes per chip (as it reports them) > `available`."""

  def __init__(self, needed: float, available: float, message: str):
    super().__init__(message)
    self.needed, self.available = needed, available


@dataclasses.dataclass
class StepMemory:
  """Per chip, in bytes, and the compile of one per-chip batch size."""
  per_chip_batch: int
  state: int  # Parameters, optimiser state, BatchNorm statistics (replicated).
  batch: int
  temporaries: int
  peak: int  # Arguments + outputs - donated (aliased) + temporaries.
  flops_per_chip: float  # XLA's count.
  compile_s: float


def parse_topology(name: str) -> tuple[str, tuple[int, ...]]:
  """'v5e:4x4' -> ('v5e', (4, 4)); UsageError naming --topology otherwise."""
  allowed = ', '.join(f'{g}:{"x".join("N" * d)}' for g, (_, d, _) in GENERATIONS.items())
  m = re.fullmatch(r'(v\w+):(\d+(?:x\d+)*)', name or '')
  gen = m and m.group(1)
  dims = tuple(int(d) for d in m.group(2).split('x')) if m else ()
  if gen not in GENERATIONS or len(dims) != GENERATIONS[gen][1] or 0 in dims:
    raise UsageError(f'--topology={name!r} is not a TPU slice this tool knows; use one of '
                     f'{allowed} (chips per side), e.g. v5e:4x4 (16 chips) or v4:2x2x1.')
  return gen, dims


def _host_bounds_and_wrap(gen: str, dims: tuple[int, ...]) -> dict:
  # Hosts of 2x2x1 chips (MaxText's table); the torus wraps around full-size
  # sides only: 16 for v5e/v6e, every side of a v4/v5p cube of 4 and more.
  dims3 = dims + (1,) * (3 - len(dims))
  if len(dims) == 2:
    wrap = tuple(d == 16 for d in dims3[:2]) + (False,)
  else:
    wrap = (min(dims3) >= 4,) * 3
  return {'chips_per_host_bounds': tuple(min(d, b) for d, b in zip(dims3, (2, 2, 1))),
          'wrap': wrap}


def tpu_devices(topology: str) -> list[jax.Device]:
  """The compile-only devices of a TPU slice, from libtpu, on any host."""
  gen, dims = parse_topology(topology)
  if importlib.util.find_spec('libtpu') is None:
    raise UsageError("libtpu is not installed: pip install 'vgg_flax[tpu]' (jax[tpu], ~1 GB).")
  # As MaxText/AXLearn do: no TPU metadata server to ask, no TPU to open; and no
  # claim on libtpu's one-process-per-host lock, which nothing here needs.
  os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  chip_config = GENERATIONS[gen][0]
  with quiet.stderr_captured(replay_on_error=False):
    try:
      desc = topologies.get_topology_desc(topology_name=topology, platform='tpu',
                                          chip_config_name=chip_config,
                                          **_host_bounds_and_wrap(gen, dims))
    except jax.errors.JaxRuntimeError as e:
      raise UsageError(f'--topology={topology}: libtpu refused it: {e}') from None
  return list(desc.devices)


def create_mesh(devices: list[jax.Device]) -> jax.sharding.Mesh:
  """The trainer's 1-D `data` mesh (`step.create_mesh`), over `devices`."""
  return jax.make_mesh((len(devices),), ('data',), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices)


def _bytes(value: str, unit: str) -> float:
  return float(value) * 1024 ** ' KMGT'.index(unit or ' ')


def _compile(fn, *args) -> tuple[jax.stages.Compiled, float]:
  start = time.perf_counter()
  with quiet.stderr_captured(replay_on_error=False):
    try:
      compiled = fn.lower(*args).compile()
    except jax.errors.JaxRuntimeError as e:
      m = _OOM.search(str(e))
      if not m:
        raise
      raise OutOfMemory(_bytes(*m.group(1, 2)), _bytes(*m.group(3, 4)),
                        str(e).splitlines()[0]) from None
  return compiled, time.perf_counter() - start


def available_hbm(mesh: jax.sharding.Mesh, gen: str) -> tuple[int, str]:
  """HBM per chip the compiler lets a program use, and where the figure comes from.

  libtpu states it in its out-of-memory error; a 1 TiB constant provokes one
  in milliseconds. Falls back to the datasheet.
  """
  too_big = jax.jit(lambda x: jnp.zeros((2**40,), jnp.int8) + x,
                    out_shardings=NamedSharding(mesh, P()))
  try:
    _compile(too_big, jax.ShapeDtypeStruct((), jnp.int8))
  except OutOfMemory as e:
    return int(e.available), 'libtpu'
  except jax.errors.JaxRuntimeError:
    pass
  return GENERATIONS[gen][2], 'datasheet'


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
  """Compiles `step_lib.make_train_step(config)` over `mesh` for any per-chip batch."""

  def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
               num_classes: int, channels: int, train_examples: int):
    self.config, self.mesh, self.channels = config, mesh, channels
    self.chips = mesh.devices.size
    self.replicated = NamedSharding(mesh, P())
    self.data_sharding = NamedSharding(mesh, P('data'))
    steps_per_epoch = max(1, train_examples // config.batch_size)  # Only the schedule uses it.
    self.model, tx, lr_fn = step_lib.create_model_and_optimizer(config, num_classes,
                                                             steps_per_epoch)
    self.state = step_lib.abstract_train_state(self.model, tx, config, channels, self.replicated)
    self.state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self.state))
    self.step = step_lib.make_train_step(config, lr_fn, mesh)

  def batch(self, per_chip_batch: int) -> dict[str, jax.ShapeDtypeStruct]:
    b, s = per_chip_batch * self.chips, self.config.image_size
    # As the trainer feeds it: float32, or uint8 normalised inside the step.
    dtype = jnp.uint8 if self.config.input.uint8_transfer else jnp.float32
    return {'image': jax.ShapeDtypeStruct((b, s, s, self.channels), dtype,
                                          sharding=self.data_sharding),
            'label': jax.ShapeDtypeStruct((b,), jnp.int32, sharding=self.data_sharding)}

  def __call__(self, per_chip_batch: int) -> StepMemory:
    """Compiles at `per_chip_batch`; raises OutOfMemory (arguments + temporaries) when
    it does not fit."""
    batch = self.batch(per_chip_batch)
    batch_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(batch)) // self.chips
    try:
      compiled, seconds = _compile(self.step, self.state, batch)
    except OutOfMemory as e:  # It names the temporaries alone: add the arguments.
      e.needed += self.state_bytes + batch_bytes
      raise
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # Older jax: one per device.
    return StepMemory(
        per_chip_batch=per_chip_batch, state=self.state_bytes,
        batch=batch_bytes,
        temporaries=mem.temp_size_in_bytes,
        peak=(mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
              + mem.temp_size_in_bytes),
        flops_per_chip=float(cost['flops']), compile_s=seconds)


def largest_batch(compile_at: Callable[[int], StepMemory], failed: int, needed: float,
                  hbm: float, state_bytes: int, max_compiles: int = 6) -> tuple[int, bool]:
  """The largest per-chip batch below `failed` that compiles, and whether it is exact.

  Bisects between a size that fits and one that does not; each probe is where
  a straight line through the two known (batch, bytes) points meets `hbm`,
  clamped inside the bracket, so that a few compiles suffice for any model.
  """
  lo, lo_bytes = 0, float(state_bytes)  # Batch 0: the state alone.
  hi, hi_bytes = failed, needed
  for _ in range(max_compiles):
    if hi - lo <= 1:
      break
    slope = (hi_bytes - lo_bytes) / (hi - lo)
    guess = lo + int((hbm - lo_bytes) / slope) if slope > 0 else (lo + hi) // 2
    # Clamp into the bracket, leaning to the side the line predicts.
    probe = min(max(guess, lo + 1), hi - 1)
    try:
      memory = compile_at(probe)
      lo, lo_bytes = probe, float(memory.peak)
    except OutOfMemory as e:
      hi, hi_bytes = probe, e.needed
  return lo, hi - lo <= 1


def analyse(config: ml_collections.ConfigDict, topology: str, *, num_classes: int | None = None,
            channels: int | None = None, mfu: float = 0.5, search: bool = True) -> dict:
  """Compiles the step of `config` for `topology`; the figures `--json` writes.

  Raises:
    UsageError: unknown topology, a batch that does not divide over the chips,
      an invalid config, or libtpu missing; before any compile.
  """
  gen, dims = parse_topology(topology)
  if not 0 < mfu <= 1:
    raise UsageError(f'--mfu={mfu}: must be in (0, 1].')
  try:
    config_lib.validate(config)
  except ValueError as e:
    raise UsageError(str(e)) from None
  num_classes, channels, examples = dataset_shape(config, num_classes, channels)
  chips = math.prod(dims)  # One device per chip (v4/v5p: megacore).
  if config.batch_size % chips:
    raise UsageError(f'--config.batch_size={config.batch_size} does not divide over the '
                     f'{chips} chips of {topology}; use a multiple of {chips}.')
  devices = tpu_devices(topology)
  mesh = create_mesh(devices)
  hbm, hbm_source = available_hbm(mesh, gen)
  compile_at = StepCompiler(config, mesh, num_classes, channels, examples)
  per_chip = config.batch_size // chips
  flops_per_image = flops.train_flops(compile_at.model, config.image_size, channels)
  peak_flops, _ = flops.device_peak_flops(devices[0])
  images_per_sec_at_peak = chips * peak_flops / flops_per_image
  result = {
      'topology': topology, 'device_kind': devices[0].device_kind, 'chips': chips,
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
    needed = e.needed
    result.update(fits=False, bytes_per_chip=int(needed), compiler_error=str(e),
                  state_bytes_per_chip=compile_at.state_bytes)
    if search:
      best, exact = largest_batch(compile_at, per_chip, needed, hbm, compile_at.state_bytes)
      result.update(largest_per_chip_batch=best, largest_batch_exact=exact)
    return result
  result.update(
      fits=True, bytes_per_chip=memory.peak, state_bytes_per_chip=memory.state,
      batch_bytes_per_chip=memory.batch, temp_bytes_per_chip=memory.temporaries,
      flops_per_step=memory.flops_per_chip * chips, compile_seconds=memory.compile_s)
  return result


def summary(r: dict) -> str:
  """The report a user reads."""
  gib = lambda b: f'{b / GiB:.2f} GiB'
  lines = [f'{r["model"]} ({r["dtype"]}, conv {r["conv_impl"]}), batch {r["batch_size"]} '
           f'({r["per_chip_batch"]} per chip) at {r["image_size"]} px on {r["topology"]}: '
           f'{r["chips"]} x {r["device_kind"]}, {r["hosts"]} host(s).',
           f'HBM per chip ({r["hbm_source"]}): {gib(r["hbm_bytes_per_chip"])}']
  if r['fits']:
    lines += [
        'Per chip:',
        f'  parameters + optimiser state  {gib(r["state_bytes_per_chip"])}',
        f'  batch                         {gib(r["batch_bytes_per_chip"])}',
        f'  temporaries                   {gib(r["temp_bytes_per_chip"])}',
        f'  peak                          {gib(r["bytes_per_chip"])} of '
        f'{gib(r["hbm_bytes_per_chip"])} '
        f'({r["bytes_per_chip"] / r["hbm_bytes_per_chip"]:.0%})',
        f'FLOPs per step: {r["flops_per_step"]:.4g} (XLA), {r["analytic_flops_per_step"]:.4g} '
        f'(analytic, vgg_flax.models.flops; XLA/analytic = '
        f'{r["flops_per_step"] / r["analytic_flops_per_step"]:.3f})',
        f'Compiled in {r["compile_seconds"]:.1f} s.']
  lines += [
      f'At the datasheet peak ({r["peak_flops_per_chip"] / 1e12:.0f} TFLOP/s per chip): '
      f'{r["step_seconds_at_peak"] * 1e3:.1f} ms per step, '
      f'{r["images_per_sec_at_peak"]:,.0f} images/s.',
      f'At {r["mfu"]:.0%} MFU: {r["step_seconds_at_mfu"] * 1e3:.1f} ms per step, '
      f'{r["images_per_sec_at_mfu"]:,.0f} images/s.']
  if r['fits']:
    lines.append(f'FITS: {gib(r["bytes_per_chip"])} of {gib(r["hbm_bytes_per_chip"])} HBM per chip.')
  else:
    line = (f'DOES NOT FIT: needs about {gib(r["bytes_per_chip"])} of HBM per chip, '
            f'{gib(r["hbm_bytes_per_chip"])} available ({r["compiler_error"]}).')
    if 'largest_per_chip_batch' in r:
      best = r['largest_per_chip_batch']
      line += (f' The largest per-chip batch that fits is {best}'
               f'{"" if r["largest_batch_exact"] else " or more"}: '
               f'--config.batch_size={best * r["chips"]}.' if best else
               ' Not even one image per chip fits.')
    lines.append(line)
  return '\n'.join(lines)


def define_flags() -> None:
  config_flags.DEFINE_config_file(
      'config', None, 'Config file (configs/*.py); override fields with --config.FIELD=VALUE.',
      lock_config=True)
  flags.mark_flag_as_required('config')
  flags.DEFINE_string('topology', None, 'TPU slice, e.g. v5e:2x2, v5e:4x4, v4:2x2x1, '
                      'v5p:2x2x1, v6e:4x4.', required=True)
  flags.DEFINE_float('mfu', 0.5, 'Model FLOPs utilisation for the throughput estimate.')
  flags.DEFINE_integer('num_classes', None, 'Default: config.model.num_classes, else the '
                       "config's dataset (imagenet2012: 1000).")
  flags.DEFINE_integer('channels', None, "Image channels; default: the config's dataset.")
  flags.DEFINE_bool('search', True, 'When the step does not fit, compile a few more batch '
                    'sizes to find the largest that does.')
  flags.DEFINE_string('json', None, 'Write the figures to this JSON file.')


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  # Compile-only: this process runs nothing on a TPU, so it never opens one.
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
