"""The accelerators `vgg_flax.aot` compiles the train step for, described on any host.

  --topology=v5e:4x4   a TPU slice: generation and chips per side (libtpu:
                       pip install 'vgg_flax[tpu]')
  --topology=h100:8    one host of 8 H100s; h100:2x8, two such hosts (JAX's CUDA
                       plugin and ptxas: pip install 'vgg_flax[gpu-aot]')

libtpu describes the devices of any TPU slice. JAX's CUDA plugin compiles for a
GPU it has never seen ("deviceless") from XLA's description of it, a
`stream_executor.GpuTargetConfigProto`: vgg_flax ships XLA's for the GPUs it
names (vgg_flax/gpu_specs/). Neither needs the accelerator, and both need JAX
on the CPU platform: the CUDA plugin registers only where it does not look for
a GPU. What the compiled GPU program lacks, XLA's FLOP count, comes from the
lowered module (`lowered_flops`); whether its convolutions are cuDNN's, from
its text (`cudnn_convolutions`).
"""

from __future__ import annotations

import collections
import dataclasses
import importlib.resources
import importlib.util
import math
import os
import re
import shutil

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from vgg_flax.models import flops
from vgg_flax.runtime import errors
from vgg_flax.runtime import quiet

GiB = 2**30
# Per TPU generation: libtpu's chip configuration (v4 and v5p chips are one
# "megacore" device, as JAX shows them on a TPU VM) and the topology's dimensions.
TPU_GENERATIONS = {'v4': ('megacore', 3), 'v5e': ('default', 2), 'v5p': ('megacore', 3),
                   'v6e': ('default', 2)}
# Per GPU name: its target spec in vgg_flax/gpu_specs/ (XLA's file name).
GPUS = {'h100': 'h100_sxm', 'h200': 'h200', 'a100-40': 'a100_sxm_40',
        'a100-80': 'a100_sxm_80', 'v100': 'v100'}
# The share of a GPU's memory JAX's allocator takes (its default
# XLA_PYTHON_CLIENT_MEM_FRACTION): the most a step may use.
GPU_MEM_FRACTION = 0.75
_TPU_OOM = re.compile(
    r'RESOURCE_EXHAUSTED.*?\(([\d.]+)([KMGT]?)\)[^()]*available HBM \(([\d.]+)([KMGT]?)\)', re.S)
_CUDNN_CONV = re.compile(r'custom_call_target="__cudnn\$conv(\w*)"')


class UsageError(errors.UsageError):
  """Bad input: reported in one line, before anything is compiled."""


class OutOfMemory(Exception):
  """The step needs `needed` bytes per device (as the compiler reports them) > `available`."""

  def __init__(self, needed: float, available: float, message: str):
    super().__init__(message)
    self.needed, self.available = needed, available


@dataclasses.dataclass(frozen=True)
class Topology:
  """A parsed --topology: 'v5e:4x4' or 'h100:2x8'."""
  name: str
  platform: str  # 'tpu' or 'cuda'.
  kind: str  # A key of TPU_GENERATIONS or GPUS.
  dims: tuple[int, ...]  # TPU: chips per side; GPU: (hosts, GPUs per host).

  @property
  def num_devices(self) -> int:
    return math.prod(self.dims)  # One device per chip (v4/v5p: megacore).

  @property
  def unit(self) -> str:
    return 'chip' if self.platform == 'tpu' else 'GPU'


def allowed() -> str:
  """The --topology forms, for help and errors."""
  tpus = ', '.join(f'{g}:{"x".join("N" * d)}' for g, (_, d) in TPU_GENERATIONS.items())
  return (f'TPU slices {tpus} (chips per side), e.g. v5e:4x4 (16 chips) or v4:2x2x1; '
          f'GPUs {", ".join(f"{g}:N" for g in GPUS)} (GPUs on one host) or NAME:HxN '
          '(H hosts of N), e.g. h100:8 or h100:2x8')


def parse(name: str) -> Topology:
  """'v5e:4x4', 'h100:8' or 'h100:2x8' -> Topology; UsageError naming the forms otherwise."""
  m = re.fullmatch(r'([\w-]+):(\d+(?:x\d+)*)', name or '')
  kind = m.group(1) if m else ''
  dims = tuple(int(d) for d in m.group(2).split('x')) if m else ()
  if kind in TPU_GENERATIONS and len(dims) == TPU_GENERATIONS[kind][1] and 0 not in dims:
    return Topology(name, 'tpu', kind, dims)
  if kind in GPUS and len(dims) in (1, 2) and 0 not in dims:
    return Topology(name, 'cuda', kind, (1,) * (2 - len(dims)) + dims)
  raise UsageError(f'--topology={name!r} is not a TPU slice or GPU host this tool knows; '
                   f'use one of {allowed()}.')


def devices(topology: Topology) -> list[jax.Device]:
  """The compile-only devices of `topology`, on any host."""
  if topology.platform == 'tpu':
    return _tpu_devices(topology)
  if importlib.util.find_spec('jax_cuda12_plugin') is None:
    raise UsageError("JAX's CUDA plugin is not installed: pip install 'vgg_flax[gpu-aot]' "
                     '(jax-cuda12-plugin and ptxas, about 270 MB; no GPU needed).')
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  hosts, per_host = topology.dims
  with quiet.stderr_captured(replay_on_error=False):
    try:  # Partitions x hosts per partition x GPUs per host.
      desc = topologies.get_topology_desc(platform='cuda', target_config=gpu_spec(topology),
                                          topology=f'1x{hosts}x{per_host}')
    except NotImplementedError:  # The plugin did not register: JAX looked for a GPU.
      raise UsageError('JAX\'s CUDA plugin compiles without a GPU only on the CPU platform: '
                       'set JAX_PLATFORMS=cpu before JAX starts.') from None
    except jax.errors.JaxRuntimeError as e:
      raise UsageError(f'--topology={topology.name}: the CUDA plugin refused it: {e}') from None
  return list(desc.devices)


def _tpu_devices(topology: Topology) -> list[jax.Device]:
  if importlib.util.find_spec('libtpu') is None:
    raise UsageError("libtpu is not installed: pip install 'vgg_flax[tpu]' (jax[tpu], ~1 GB).")
  # As MaxText/AXLearn do: no TPU metadata server to ask, no TPU to open; and no
  # claim on libtpu's one-process-per-host lock, which nothing here needs.
  os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  # Hosts of 2x2x1 chips (MaxText's table); the torus wraps around full-size
  # sides only: 16 for v5e/v6e, every side of a v4/v5p cube of 4 and more.
  dims = topology.dims
  dims3 = dims + (1,) * (3 - len(dims))
  wrap = (tuple(d == 16 for d in dims3[:2]) + (False,) if len(dims) == 2
          else (min(dims3) >= 4,) * 3)
  with quiet.stderr_captured(replay_on_error=False):
    try:
      desc = topologies.get_topology_desc(
          topology_name=topology.name, platform='tpu',
          chip_config_name=TPU_GENERATIONS[topology.kind][0], wrap=wrap,
          chips_per_host_bounds=tuple(min(d, b) for d, b in zip(dims3, (2, 2, 1))))
    except jax.errors.JaxRuntimeError as e:
      raise UsageError(f'--topology={topology.name}: libtpu refused it: {e}') from None
  return list(desc.devices)


def gpu_spec(topology: Topology) -> str:
  """The text of the GpuTargetConfigProto of `topology`'s GPU (package data)."""
  return (importlib.resources.files('vgg_flax') / 'gpu_specs' / f'{GPUS[topology.kind]}.txtpb'
          ).read_text()


def compiler_options(topology: Topology) -> dict[str, str]:
  """GPU: the ptxas of nvidia-cuda-nvcc-cu12 (matching the plugin's CUDA 12, which
  still builds for V100s) over any other on the PATH."""
  if topology.platform != 'cuda':
    return {}
  nvcc = importlib.util.find_spec('nvidia.cuda_nvcc')
  for folder in (nvcc.submodule_search_locations or []) if nvcc else []:
    if os.path.exists(os.path.join(folder, 'bin', 'ptxas')):
      return {'xla_gpu_cuda_data_dir': folder}
  if shutil.which('ptxas') or os.path.exists('/usr/local/cuda/bin/ptxas'):
    return {}
  raise UsageError("Compiling for GPUs needs CUDA's ptxas: pip install 'vgg_flax[gpu-aot]'.")


def compile_lowered(lowered: jax.stages.Lowered, topology: Topology) -> jax.stages.Compiled:
  """`lowered.compile()` for `topology`; OutOfMemory where libtpu refuses it for its HBM."""
  with quiet.stderr_captured(replay_on_error=False):
    try:
      return lowered.compile(compiler_options(topology))
    except jax.errors.JaxRuntimeError as e:
      m = _TPU_OOM.search(str(e))
      if not m:
        raise
      raise OutOfMemory(_bytes(*m.group(1, 2)), _bytes(*m.group(3, 4)),
                        str(e).splitlines()[0]) from None


def _bytes(value: str, unit: str) -> float:
  return float(value) * 1024 ** ' KMGT'.index(unit or ' ')


def device_memory(topology: Topology, mesh: jax.sharding.Mesh) -> tuple[int, str]:
  """Bytes per device a step may use, and where the figure comes from.

  GPU: the target spec's memory times JAX's allocator share. TPU: libtpu's own
  figure, from the out-of-memory error a 1 TiB constant provokes in
  milliseconds; else the datasheet's (`flops.DEVICES`).
  """
  if topology.platform == 'cuda':
    total = int(re.search(r'device_memory_size:\s*(\d+)', gpu_spec(topology)).group(1))
    share = os.environ.get('XLA_PYTHON_CLIENT_MEM_FRACTION', str(GPU_MEM_FRACTION))
    if not re.fullmatch(r'0?\.\d+|1(\.0*)?', share):
      raise UsageError(f'XLA_PYTHON_CLIENT_MEM_FRACTION={share!r}: expected a fraction in (0, 1].')
    return int(total * float(share)), (
        f"{GPUS[topology.kind]} spec: {total / GiB:.2f} GiB x {float(share):g}, JAX's "
        "allocator's share (XLA_PYTHON_CLIENT_MEM_FRACTION)")
  too_big = jax.jit(lambda x: jnp.zeros((2**40,), jnp.int8) + x,
                    out_shardings=NamedSharding(mesh, P()))
  try:
    compile_lowered(too_big.lower(jax.ShapeDtypeStruct((), jnp.int8)), topology)
  except OutOfMemory as e:
    return int(e.available), 'libtpu'
  except jax.errors.JaxRuntimeError:
    pass
  known = flops.device_spec(mesh.devices.flat[0].device_kind)
  if not known or known[1].memory is None:
    raise UsageError(f'{mesh.devices.flat[0].device_kind}: HBM per chip unknown; '
                     'libtpu did not state it.')
  return known[1].memory, 'datasheet'


def lowered_flops(lowered: jax.stages.Lowered) -> float:
  """FLOPs of a whole step, by XLA's cost analysis of its lowered (unoptimised) module.

  For GPUs, whose deviceless executables have no cost analysis, and in whose
  optimised module cuDNN's convolutions count 0. Run on the CPU backend, over
  the global shapes; a private JAX API, hence this one function and its test.
  """
  from jax._src.lib import _jax  # pylint: disable=g-import-not-at-top
  from jax.extend import backend  # pylint: disable=g-import-not-at-top
  module = lowered.compiler_ir('hlo').as_hlo_module()
  return float(_jax.hlo_module_cost_analysis(backend.get_backend('cpu'), module)['flops'])


def cudnn_convolutions(hlo_text: str) -> dict[str, int]:
  """cuDNN convolution calls of an optimised GPU module, by kind ('Forward',
  'BackwardFilter', 'BackwardInput', 'BiasActivationForward')."""
  return dict(collections.Counter(_CUDNN_CONV.findall(hlo_text)))
