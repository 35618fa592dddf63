"""Tests for vgg_flax.summary: rows, totals and the command line."""

import os
import subprocess
import sys
import types

import pytest

from vgg_flax import config as config_lib
from vgg_flax import models
from vgg_flax import summary
import vgg_flax.data

from helpers import python

VGG16_PARAMS = 138_357_544  # torchvision vgg16 and Keras VGG16 (include_top=True).


@pytest.mark.parametrize('batch_norm,num_rows', [(False, 13 + 5 + 3), (True, 2 * 13 + 5 + 3)])
def test_vgg16_rows_and_total(batch_norm, num_rows):
  rows = summary.layer_rows(models.vgg16(batch_norm=batch_norm), (1, 224, 224, 3))
  assert len(rows) == num_rows
  assert rows[0] == ('block1_conv1', (1, 224, 224, 64), 3 * 3 * 3 * 64 + 64)
  assert rows[-1] == ('predictions', (1, 1000), 4096 * 1000 + 1000)
  assert [r.name for r in rows if r.name.endswith('pool')] == [
      f'block{b}_pool' for b in range(1, 6)]
  if not batch_norm:
    assert sum(r.num_params for r in rows) == VGG16_PARAMS


def test_format_table_totals():
  rows = [('conv', (1, 4, 4, 8), 1_000), ('pool', (1, 2, 2, 8), 0), ('fc', (1, 3), 25)]
  table = summary.format_table(rows, num_batch_stats=16).splitlines()
  assert table[0].split() == ['Layer', 'Output', 'shape', 'Params']
  assert table[2].split() == ['conv', '(1,', '4,', '4,', '8)', '1,000']
  assert table[-3:] == ['Total params: 1,025', 'Trainable params: 1,025',
                        'Batch statistics: 16 (not trainable, not in the total)']
  assert 'Batch statistics' not in summary.format_table(rows)


def test_input_spec_falls_back_when_the_dataset_is_unreadable(monkeypatch, capsys):
  def broken(config):
    raise RuntimeError('no data here')

  fake = types.ModuleType('vgg_flax.data.input_pipeline')
  fake.dataset_info = broken
  monkeypatch.setitem(sys.modules, 'vgg_flax.data.input_pipeline', fake)
  monkeypatch.setattr(vgg_flax.data, 'input_pipeline', fake)
  config = config_lib.get_base_config()
  config.input.mean = (127.5,)
  assert summary.input_spec(config) == (1000, 1)
  assert 'no data here' in capsys.readouterr().out
  config.model.num_classes = 10
  assert summary.input_spec(config) == (10, 1)

  fake.dataset_info = lambda config: types.SimpleNamespace(num_classes=7, num_channels=3)
  config.model.num_classes = None
  assert summary.input_spec(config) == (7, 3)


def test_command_line_prints_the_table(tmp_path):
  config_file = tmp_path / 'vgg16_config.py'
  config_file.write_text(
      'from vgg_flax.config import get_base_config\n\n'
      'def get_config():\n'
      '  config = get_base_config()\n'
      '  config.model.num_classes = 1000\n'
      '  return config\n')
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  out = subprocess.run(
      [python(), '-m', 'vgg_flax.summary', f'--config={config_file}',
       '--config.model.batch_norm=True'],
      capture_output=True, text=True, env=env, timeout=120, check=True).stdout
  lines = out.strip().splitlines()
  assert lines[-3:] == ['Total params: 138,365,992', 'Trainable params: 138,365,992',
                        'Batch statistics: 8,448 (not trainable, not in the total)']
  assert sum(1 for line in lines if line.startswith('block')) == 2 * 13 + 5
