"""vgg_flax.aot: the trainer's step compiled by libtpu for a TPU slice, on this CPU host."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from helpers import ROOT, tiny_config
from vgg_flax import aot
from vgg_flax import models
from vgg_flax.models import flops

if importlib.util.find_spec('libtpu') is None:
  pytest.skip("libtpu is not installed (pip install -e '.[tpu]')", allow_module_level=True)

GiB = 2**30
# A tiny VGG-11 (width 16, 32 px, 3 channels) for 4 chips; conv_impl pinned to lax.conv,
# the TPU's own. (At width 8 or 64 px, XLA's TPU count is off the textbook one by
# 15-30%: it skips the zero padding and pads thin channels.)
TINY = ['--config=configs/default.py', '--config.model.depth=11', '--config.model.width=16',
        '--config.model.fc_dim=32', '--config.model.conv_impl=xla',
        '--config.model.batch_norm=false', '--channels=3']


def run_aot(*args, json_path=None):
  cmd = [sys.executable, '-m', 'vgg_flax.aot', *TINY, *args]
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
  # libtpu's start-up errors (no TPU, no worker hostnames) stay hidden.
  assert 'TPU_WORKER_HOSTNAMES' not in proc.stderr and 'E0000' not in proc.stderr


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


def test_bad_topology_is_refused_before_compiling():
  proc, r = run_aot('--topology=v5e:3')
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1] == (
      "error: --topology='v5e:3' is not a TPU slice this tool knows; use one of v4:NxNxN, "
      'v5e:NxN, v5p:NxNxN, v6e:NxN (chips per side), e.g. v5e:4x4 (16 chips) or v4:2x2x1.')


@pytest.mark.parametrize('overrides, topology, message', [
    ({'batch_size': 6}, 'v5e:2x2', '--config.batch_size=6 does not divide over the 4 chips of '
     'v5e:2x2; use a multiple of 4.'),
    ({}, 'v7:2x2', "--topology='v7:2x2' is not a TPU slice"),
    ({}, 'v4:2x2', "--topology='v4:2x2' is not a TPU slice"),
    ({'dataset': 'my_photos'}, 'v5e:2x2', "config.dataset='my_photos' is not one of "
     "['cifar10', 'cifar100', 'digits', 'imagenet2012']; give --num_classes and --channels."),
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
