"""Smoke test of vgg_flax.benchmark (not a timed test) and the no-recompile check."""

import json
import pathlib
import sys

import jax
import numpy as np
import pytest

from vgg_flax import benchmark

from helpers import devices_env, python

TINY = dict(width=8, fc_dim=16)


def test_second_step_on_a_new_batch_does_not_recompile():
  config = benchmark.make_config(11, 32, 4, **TINY)
  step = benchmark.FlaxStep(config, num_classes=10)
  step.run(1)
  assert step.jitted._cache_size() == 1
  rng = np.random.default_rng(1)
  new_image = jax.device_put(rng.standard_normal((4, 32, 32, 3), np.float32),
                             step.batch['image'].sharding)
  step.batch = dict(step.batch, image=new_image)
  old_params = step.state.params
  step.run(2)
  assert step.jitted._cache_size() == 1
  assert int(step.state.step) == 3
  assert old_params['fc1']['kernel'].is_deleted()  # The state was donated.


def test_benchmark_cli_smoke(tmp_path):
  path = tmp_path / 'out.json'
  benchmark.main(['--depths=11', '--workloads=32x4', '--width=8', '--fc_dim=16',
                  '--num_classes=10', '--steps=1', '--rounds=2', f'--json={path}'])
  out = json.loads(path.read_text())
  (r,) = out['results']
  assert (r['model'], r['image_size'], r['batch_size']) == ('vgg11', 32, 4)
  assert r['images_per_sec'] > 0 and len(r['round_images_per_sec']) == 2
  assert r['mfu'] == pytest.approx(r['model_gflops_per_sec'] * 1e9 / out['peak_flops'])
  assert not r['recompiled'] and r['compile_s'] > 0
  assert out['peak_source'] == 'measured float32 matmul'
  assert set(out['machine']['cpu_matrix_features']) <= {'avx512_bf16', 'amx_bf16', 'amx_tile'}


def test_header_names_the_cpu_and_its_matrix_features(monkeypatch):
  from vgg_flax.runtime import cpu
  monkeypatch.setattr(cpu, 'model_name', lambda: 'AMD EPYC 9B14')
  monkeypatch.setattr(cpu, 'matrix_features', lambda: frozenset({'avx512_bf16'}))
  assert 'host CPU AMD EPYC 9B14 (avx512_bf16)' in benchmark.header()
  monkeypatch.setattr(cpu, 'matrix_features', frozenset)
  assert '(no bf16 arithmetic)' in benchmark.header()


def test_mfu_counts_the_peak_of_every_device(tmp_path):
  # Regression: global throughput was divided by one device's peak, so an
  # 8-GPU host showed 8x its MFU.
  import subprocess
  path = tmp_path / 'out.json'
  env = devices_env(4)
  subprocess.run([python(), '-m', 'vgg_flax.benchmark', '--depths=11', '--workloads=32x4',
                  '--width=8', '--fc_dim=16', '--num_classes=10', '--steps=1', '--rounds=1',
                  f'--json={path}'], check=True, env=env, capture_output=True, timeout=300)
  out = json.loads(path.read_text())
  (r,) = out['results']
  assert out['machine']['device_count'] == 4
  assert r['mfu'] == pytest.approx(r['model_gflops_per_sec'] * 1e9 / (4 * out['peak_flops']))


def test_torch_peer_smoke(tmp_path):
  pytest.importorskip('torch')
  out = benchmark.run(benchmark.parse_args(
      ['--depths=11', '--workloads=32x2', '--width=8', '--fc_dim=16', '--num_classes=10',
       '--steps=1', '--rounds=1', '--torch']))
  (r,) = out['results']
  assert r['torch_images_per_sec'] > 0 and r['torch_mode'] == 'float32, NCHW'
  assert r['ratio_vs_torch'] == pytest.approx(r['images_per_sec'] / r['torch_images_per_sec'])


def test_torch_peer_in_bf16_is_autocast_with_channels_last():
  torch = pytest.importorskip('torch')
  sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / 'benchmarks'))
  import torch_peer  # pylint: disable=g-import-not-at-top
  step = torch_peer.TorchStep(11, 32, 2, num_classes=10, bf16=True, width=8, fc_dim=16)
  assert step.channels_last and step.x.is_contiguous(memory_format=torch.channels_last)
  assert step.model.features[0].weight.is_contiguous(memory_format=torch.channels_last)
  assert step() > 0
  assert not torch_peer.TorchStep(11, 32, 2, width=8, fc_dim=16).channels_last


def test_bad_workloads_flag_fails_clearly():
  with pytest.raises(SystemExit):
    benchmark.parse_args(['--workloads=32by128'])


def test_conv_layers_script_times_each_lowering_and_names_the_choice(capsys):
  sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / 'benchmarks'))
  import conv_layers  # pylint: disable=g-import-not-at-top
  conv_layers.main(['--workload=32x2', '--width=8', '--lowerings=winograd4',
                    '--reps=1'])
  rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith('| ')]
  assert rows[0] == '| layer | winograd4 | auto picks |'
  assert len(rows) == 1 + len(conv_layers.VGG16_LAYERS)
  # Block 1 reads the 3 image channels, so 'winograd' keeps the patches there.
  assert rows[1].startswith('| 32 px, 3->8 |') and rows[1].endswith('| patches |')
  with pytest.raises(SystemExit):
    conv_layers.main(['--lowerings=fft'])
