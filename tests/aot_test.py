"""vgg_flax.aot: the trainer's step compiled for a TPU slice (libtpu) or GPUs (JAX's CUDA
plugin), on this CPU host."""

import importlib.util
import json
import math
import os
import re
import subprocess

import jax
import jax.numpy as jnp
import pytest

from helpers import ROOT, python, tiny_config
from vgg_flax import aot
from vgg_flax import models
from vgg_flax.models import flops
from vgg_flax.training import topologies

# A skip for a missing test extra fails under CI=true (skip_policy.TEST_EXTRAS).
tpu = pytest.mark.skipif(importlib.util.find_spec('libtpu') is None,
                         reason="libtpu is not installed (pip install -e '.[tpu]')")
gpu = pytest.mark.skipif(importlib.util.find_spec('jax_cuda12_plugin') is None,
                         reason="jax_cuda12_plugin is not installed (pip install -e '.[gpu-aot]')")

GiB = 2**30
# A tiny VGG-11 (width 16, 32 px, 3 channels) for 4 chips; conv_impl pinned to lax.conv,
# the TPU's own. (At width 8 or 64 px, XLA's TPU count is off the textbook one by
# 15-30%: it skips the zero padding and pads thin channels.)
TINY = ['--config=configs/default.py', '--config.model.depth=11', '--config.model.width=16',
        '--config.model.fc_dim=32', '--config.model.conv_impl=xla',
        '--config.model.batch_norm=false', '--channels=3']


def run_aot(*args, json_path=None, tiny=tuple(TINY)):
  cmd = [python(), '-m', 'vgg_flax.aot', *tiny, *args]
  if json_path:
    cmd.append(f'--json={json_path}')
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  report = json.loads(open(json_path).read()) if json_path and os.path.exists(json_path) else None
  return proc, report


@pytest.fixture(scope='session')
def fitting(tmp_path_factory):
  """Batch 4 (1 per chip) on v5e:2x2: one compile."""
  path = tmp_path_factory.mktemp('aot') / 'fit.json'
  return run_aot('--topology=v5e:2x2', '--config.batch_size=4', json_path=path)


@tpu
def test_step_that_fits_reports_memory_flops_and_speed(fitting):
  proc, r = fitting
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert r['topology'] == 'v5e:2x2' and r['chips'] == 4 and r['hosts'] == 1
  assert r['device_kind'] == 'TPU v5 lite'
  assert r['batch_size'] == 4 and r['per_chip_batch'] == 1 and r['fits'] is True
  # libtpu's own figure: 16 GiB less what the runtime keeps.
  assert r['hbm_source'] == 'libtpu' and r['hbm_bytes_per_chip'] == int(15.75 * GiB)
  assert 0 < r['state_bytes_per_chip'] < r['bytes_per_chip'] < r['hbm_bytes_per_chip']
  assert r['batch_bytes_per_chip'] == (32 * 32 * 3 + 1) * 4  # float32 pixels, an int32 label.
  config = tiny_config('unused', **{'model.batch_norm': False, 'model.width': 16})
  analytic = flops.train_flops(models.create_model(config.model, 10), 32, 3) * 4
  assert r['analytic_flops_per_step'] == analytic
  assert r['flops_per_step'] == pytest.approx(analytic, rel=0.1)
  assert r['images_per_sec_at_peak'] == pytest.approx(4 * 197e12 / (analytic / 4))
  assert r['images_per_sec_at_mfu'] == pytest.approx(0.5 * r['images_per_sec_at_peak'])
  assert 'FITS:' in proc.stdout and '15.75 GiB' in proc.stdout
  assert r['compiles'] == 1 and proc.stdout.startswith('compile 1: batch 4 (1 per chip) for ')
  assert (r['lowered_convolutions'], r['native_convolutions']) == (23, True)
  # libtpu's start-up errors (no TPU, no worker hostnames) stay hidden.
  assert 'TPU_WORKER_HOSTNAMES' not in proc.stderr and 'E0000' not in proc.stderr


@tpu
def test_step_that_does_not_fit_names_the_hbm(tmp_path):
  # 512 px, 512 images per chip: ~18 GiB of activations; the compiler refuses in seconds.
  proc, r = run_aot('--topology=v5e:2x2', '--config.batch_size=2048',
                    '--config.image_size=512', '--config.input.scale_min=512',
                    '--config.input.scale_max=512', '--config.input.eval_resize=512',
                    '--nosearch', json_path=tmp_path / 'oom.json')
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert r['fits'] is False and r['bytes_per_chip'] > r['hbm_bytes_per_chip'] == int(15.75 * GiB)
  assert 'DOES NOT FIT: needs about' in proc.stdout
  assert 'GiB of HBM per chip, 15.75 GiB available' in proc.stdout
  assert 'exceeds available HBM (15.75G)' in r['compiler_error']
  assert r['compiles'] == 1 and 'compile 1: ' in proc.stdout and 'compile 2: ' not in proc.stdout


def test_bad_topology_is_refused_before_compiling():
  proc, r = run_aot('--topology=v5e:3')
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1] == (
      "error: --topology='v5e:3' is not a TPU slice or GPU host this tool knows; use one of "
      'TPU slices v4:NxNxN, v5e:NxN, v5p:NxNxN, v6e:NxN (chips per side), e.g. v5e:4x4 '
      '(16 chips) or v4:2x2x1; GPUs h100:N, h200:N, a100-40:N, a100-80:N, v100:N (GPUs on one '
      'host) or NAME:HxN (H hosts of N), e.g. h100:8 or h100:2x8.')
  assert 'compile 1' not in proc.stdout


@pytest.mark.parametrize('overrides, topology, message', [
    ({'batch_size': 6}, 'v5e:2x2', '--config.batch_size=6 does not divide over the 4 chips of '
     'v5e:2x2; use a multiple of 4.'),
    ({}, 'v7:2x2', "--topology='v7:2x2' is not a TPU slice"),
    ({}, 'v4:2x2', "--topology='v4:2x2' is not a TPU slice"),
    ({'dataset': 'my_photos'}, 'v5e:2x2', "config.dataset='my_photos' is not one of "
     "['cifar10', 'cifar100', 'digits', 'imagenet2012']; give --num_classes and --channels."),
    ({'batch_size': 12}, 'h100:2x8', '--config.batch_size=12 does not divide over the 16 GPUs '
     'of h100:2x8; use a multiple of 16.'),
    ({}, 'b200:8', "--topology='b200:8' is not a TPU slice or GPU host this tool knows; use "
     'one of TPU slices'),
    ({}, 'h100:1x2x8', "--topology='h100:1x2x8' is not a TPU slice or GPU host"),
])
def test_bad_input_is_refused_before_libtpu(overrides, topology, message):
  with pytest.raises(aot.UsageError) as e:
    aot.analyse(tiny_config('unused', **overrides), topology)
  assert str(e.value).startswith(message)


def test_largest_batch_search_brackets_the_limit():
  """The search against a memory of 100 + 3 x batch bytes and 1000 available."""
  compiled = []

  def compile_at(batch):
    compiled.append(batch)
    if 100 + 3 * batch > 1000:
      raise aot.OutOfMemory(100 + 3 * batch, 1000, 'RESOURCE_EXHAUSTED')
    return aot.StepMemory(batch, 100, 0, 3 * batch, 100 + 3 * batch, 0.0, 0.0)

  assert aot.largest_batch(compile_at, 2048, 100 + 3 * 2048, 1000, state_bytes=100) == (300, True)
  assert len(compiled) <= 3


@pytest.mark.parametrize('missing, message', [
    (('jax_cuda12_plugin',), "JAX's CUDA plugin is not installed: pip install 'vgg_flax[gpu-aot]'"),
    (('nvidia.cuda_nvcc', 'ptxas'), "Compiling for GPUs needs CUDA's ptxas: pip install "
     "'vgg_flax[gpu-aot]'."),
])
def test_gpu_without_the_extra_is_refused_before_compiling(monkeypatch, missing, message):
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, 'find_spec',
                      lambda name, *a: None if name in missing else find_spec(name, *a))
  if 'ptxas' in missing:  # Nor on the PATH, nor in /usr/local/cuda.
    monkeypatch.setattr(topologies.shutil, 'which', lambda name: None)
    monkeypatch.setattr(topologies.os.path, 'exists', lambda path: False)
  with pytest.raises(aot.UsageError) as e:
    aot.analyse(tiny_config('unused'), 'h100:8')
  assert str(e.value).startswith(message)


def _search(memory, failed, available, state):
  """largest_batch against `memory(batch)` bytes; (result, batches compiled)."""
  compiled = []

  def compile_at(batch):
    compiled.append(batch)
    if memory(batch) > available:
      raise aot.OutOfMemory(memory(batch), available, 'RESOURCE_EXHAUSTED')
    return aot.StepMemory(batch, state, 0, 0, memory(batch), 0.0, 0.0)

  return aot.largest_batch(compile_at, failed, memory(failed), available, state), compiled


def test_largest_batch_search_is_bounded_where_memory_is_not_linear():
  # Convex (the line through batch 0 overshoots): the prediction fails, then one halving step.
  (best, exact), compiled = _search(lambda b: 100 + 2 * b + 0.002 * b * b, 2048, 1000, 100)
  assert len(compiled) <= 3 and 0 < best and 100 + 2 * best + 0.002 * best ** 2 <= 1000
  assert best >= 0.8 * 337  # The true largest: 337.
  # libtpu's figure for a refused step is flat near the limit (after rematerialisation):
  # the probes after a failure go at most halfway down, and what is found fits.
  needs = lambda b: 100 + 0.12 * b * 1024 if b <= 128 else max(19.1 * 1024, 0.072 * b * 1024)
  (best, exact), compiled = _search(needs, 512, 15.75 * 1024, 100)
  assert len(compiled) <= 3 and 0 < best <= 128 and not exact
  # Nothing fits: the state alone is too big, and no compile is spent.
  assert _search(lambda b: 2000 + b, 64, 1000, 2000) == ((0, True), [])


def test_lowered_flops_is_xla_cost_analysis_of_the_lowered_module():
  """The private JAX API behind the GPU FLOPs, on a (64 x 128) @ (128 x 32) matmul."""
  lowered = jax.jit(jnp.dot).lower(jax.ShapeDtypeStruct((64, 128), jnp.float32),
                                   jax.ShapeDtypeStruct((128, 32), jnp.float32))
  assert topologies.lowered_flops(lowered) == 2 * 64 * 128 * 32


def test_cudnn_convolutions_are_counted_by_kind():
  text = ('%a = custom-call(), custom_call_target="__cudnn$convForward"\n'
          '%b = custom-call(), custom_call_target="__cudnn$convBackwardFilter"\n'
          '%c = custom-call(), custom_call_target="__cudnn$convForward"\n'
          '%d = custom-call(), custom_call_target="__cublas$gemm"')
  assert topologies.cudnn_convolutions(text) == {'Forward': 2, 'BackwardFilter': 1}


@gpu
@pytest.mark.parametrize('gpu_name', sorted(topologies.GPUS))
def test_every_gpu_has_a_target_spec_and_datasheet_peaks(gpu_name):
  """The package's spec describes the GPU to JAX's CUDA plugin; flops.DEVICES knows its peaks."""
  target = topologies.parse(f'{gpu_name}:2')
  devices = topologies.devices(target)
  assert len(devices) == 2 and devices[0].platform == 'gpu'
  key, spec = flops.device_spec(devices[0].device_kind)
  assert spec.bf16_flops >= spec.f32_flops > 1e13 and spec.memory is None, key
  memory, source = topologies.device_memory(target, aot.create_mesh(devices))
  assert 10 * GiB < memory < 150 * GiB and source.startswith(topologies.GPUS[gpu_name])


@pytest.mark.parametrize('name, platform, dims', [
    ('h100:8', 'cuda', (1, 8)), ('a100-40:1', 'cuda', (1, 1)), ('h100:2x8', 'cuda', (2, 8)),
    ('v100:1', 'cuda', (1, 1)), ('v5e:4x4', 'tpu', (4, 4)), ('v4:2x2x1', 'tpu', (2, 2, 1))])
def test_topologies_parse(name, platform, dims):
  t = topologies.parse(name)
  assert (t.platform, t.dims, t.num_devices) == (platform, dims, math.prod(dims))


# On GPUs XLA's FLOPs are those of the lowered step, whose convolutions count only the
# window positions inside the image: at 32 px (a 2x2 last block) 25% below the textbook
# count, at 128 px 8%. Width 8 and 128 px compile in seconds.
TINY_GPU = ['--config=configs/default.py', '--config.model.depth=11', '--config.model.width=8',
            '--config.model.fc_dim=32', '--config.model.batch_norm=false', '--channels=3',
            *(f'--config.{field}=128' for field in ('image_size', 'input.scale_min',
                                                   'input.scale_max', 'input.eval_resize'))]
STARTED = re.compile(r'^compile (\d+): batch \d+ \(\d+ per GPU\) for \S+ \.\.\.$', re.M)
ENDED = re.compile(r'^compile (\d+): [\d.]+ s: [\d.]+ GiB per GPU of [\d.]+ GiB, '
                   r'(fits|does not fit)\.$', re.M)
# (topology, extra flags, GPUs, device_kind, target spec's memory, peak FLOP/s for the dtype)
GPU_CASES = [
    ('h100:8', ['--config.model.dtype=bfloat16'], 8, 'NVIDIA H100 80GB HBM3', 84942979072, 989e12),
    ('a100-40:1', [], 1, 'NVIDIA A100-SXM4-40GB', 42331013120, 156e12),  # float32: TF32.
]


@pytest.fixture(scope='module', params=GPU_CASES, ids=[c[0] for c in GPU_CASES])
def gpu_fitting(request, tmp_path_factory):
  """One compile per GPU kind: 2 images per GPU."""
  topology, extra, gpus, *_ = request.param
  path = tmp_path_factory.mktemp('aot_gpu') / 'fit.json'
  proc, r = run_aot(f'--topology={topology}', f'--config.batch_size={2 * gpus}', *extra,
                    json_path=path, tiny=TINY_GPU)
  return request.param, proc, r


@gpu
def test_gpu_step_that_fits_reports_memory_flops_speed_and_cudnn(gpu_fitting):
  (topology, extra, gpus, kind, memory, peak), proc, r = gpu_fitting
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert (r['topology'], r['platform'], r['unit'], r['device_kind']) == (
      topology, 'cuda', 'GPU', kind)
  assert (r['chips'], r['hosts'], r['per_chip_batch'], r['fits']) == (gpus, 1, 2, True)
  # JAX's allocator takes 75% of the GPU's memory (the target spec's figure).
  assert r['hbm_bytes_per_chip'] == int(memory * 0.75)
  assert 0 < r['state_bytes_per_chip'] < r['bytes_per_chip'] < r['hbm_bytes_per_chip']
  assert r['batch_bytes_per_chip'] == 2 * (128 * 128 * 3 + 1) * 4
  assert r['temp_bytes_per_chip'] > 0
  # conv_impl 'auto': lax.conv on GPUs, each a cuDNN call: 8 forward, 8 kernel
  # gradients, 7 input gradients (none for the image). No Winograd, no patches.
  assert (r['conv_layers'], r['lowered_convolutions']) == (8, 23)
  assert sum(r['cudnn_convolutions'].values()) == 23 and r['native_convolutions'] is True
  config = tiny_config('unused', **{'model.batch_norm': False})
  analytic = flops.train_flops(models.create_model(config.model, 10), 128, 3) * 2 * gpus
  assert r['analytic_flops_per_step'] == analytic and r['flops_source'] == 'lowered'
  assert r['flops_per_step'] == pytest.approx(analytic, rel=0.1)
  assert r['peak_flops_per_chip'] == peak
  assert r['images_per_sec_at_peak'] == pytest.approx(gpus * peak / (analytic / (2 * gpus)))
  assert {'platform', 'unit', 'flops_source', 'conv_layers', 'lowered_convolutions',
          'cudnn_convolutions', 'native_convolutions', 'compiles', 'compile_seconds'} <= set(r)
  assert r['compiles'] == 1 and len(STARTED.findall(proc.stdout)) == 1
  assert ENDED.findall(proc.stdout) == [('1', 'fits')]
  assert 'FITS:' in proc.stdout and 'cuDNN calls' in proc.stdout and ': native.' in proc.stdout
  assert 'cudart_stub' not in proc.stderr and 'Traceback' not in proc.stderr


@gpu
def test_gpu_step_that_does_not_fit_names_the_memory_in_a_few_compiles(tmp_path):
  # 8192 images of 128 px on one V100 (11.83 GiB for JAX of 15.77): about 13.5 GiB.
  proc, r = run_aot('--topology=v100:1', '--config.batch_size=8192',
                    json_path=tmp_path / 'oom.json', tiny=TINY_GPU)
  assert proc.returncode == 1, proc.stderr[-2000:]
  available = int(16935682048 * 0.75)
  assert r['fits'] is False and r['bytes_per_chip'] > r['hbm_bytes_per_chip'] == available
  assert 'DOES NOT FIT: needs about' in proc.stdout
  assert 'GiB of HBM per GPU, 11.83 GiB available' in proc.stdout
  # The first compile, the line's prediction from it and the state, and its confirmation.
  started = STARTED.findall(proc.stdout)
  assert r['compiles'] == len(started) == len(ENDED.findall(proc.stdout)) <= 3
  assert started == [str(i) for i in range(1, len(started) + 1)]
  assert 0.8 * 8192 < r['largest_per_chip_batch'] < 8192
  assert f'--config.batch_size={r["largest_per_chip_batch"]}' in proc.stdout


@gpu
def test_cuda_plugin_keeps_quiet_in_cpu_runs():
  """Installed to compile for GPUs, the plugin adds nothing to a CPU run's stderr."""
  env = {k: v for k, v in os.environ.items() if k != 'JAX_PLATFORMS'}
  proc = subprocess.run([python(), '-c', 'import vgg_flax, jax; print(jax.devices())'],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert (proc.returncode, proc.stdout.strip(), proc.stderr) == (0, '[CpuDevice(id=0)]', '')


@tpu
def test_a_sharded_state_holds_a_quarter_per_chip_of_four(fitting, tmp_path):
  proc, sharded = run_aot('--topology=v5e:2x2', '--config.batch_size=4',
                          '--config.state_sharding=fsdp', json_path=tmp_path / 'fsdp.json')
  assert proc.returncode == 0, proc.stderr[-2000:]
  replicated = fitting[1]['state_bytes_per_chip']
  # Every large array splits 4 ways; biases of 10 or 32 and the step stay whole.
  assert 0.25 < sharded['state_bytes_per_chip'] / replicated < 0.27, (sharded, replicated)
