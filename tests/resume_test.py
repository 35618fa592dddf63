"""Resuming a workdir with a changed config: what continues, what is refused, what is said."""

import os

from absl import logging
import pytest

from vgg_flax.io import workdirs
from vgg_flax import train
from vgg_flax.training import checkpoint
from vgg_flax.training import reporting

from helpers import tiny_config

# Two-stage fine-tune: blocks 1-4 frozen, then everything trained.
STAGE1 = {'freeze': ('block[1-4]_',), 'num_epochs': 1}


@pytest.fixture(scope='module')
def data_dir(digits):
  return digits


@pytest.fixture()
def stage1(tmp_path, data_dir):
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(tiny_config(data_dir, **STAGE1), workdir)
  return workdir


@pytest.mark.resume
def test_unfreezing_resumes_with_a_fresh_optimiser_state(stage1, data_dir, monkeypatch):
  # Regression: this was refused as "None of the checkpoints ... restores into this model".
  warnings = []
  monkeypatch.setattr(logging, 'warning', lambda msg, *args: warnings.append(msg % args))
  train.train_and_evaluate(tiny_config(data_dir, num_epochs=2), stage1)
  assert ("config.freeze changed (nothing): restored parameters and batch statistics, with a "
          "fresh optimiser state.") in warnings
  rows = reporting.read_metrics(os.path.join(stage1, 'metrics.jsonl'))
  assert [r['step'] for r in rows if 'eval_loss' in r] == [20, 40]
  ckpt = checkpoint.Checkpointer(stage1, keep=2)
  assert ckpt.latest_step() == 40
  ckpt.close()


# adam has adamw's leaves in another tree: a flat list of leaf shapes called it
# "None of the checkpoints [20] ... restores into this model".
@pytest.mark.parametrize('optimizer', ['sgd', 'adam'])
def test_another_optimizer_is_named_not_called_another_model(stage1, data_dir, optimizer):
  config = tiny_config(data_dir, num_epochs=2, optimizer=optimizer,
                       **{'freeze': STAGE1['freeze']})
  with pytest.raises(checkpoint.StructureMismatch,
                     match=r'/20 holds the optimiser state \(another optimizer, schedule or '
                     r'config.freeze\); use another --workdir, or the config it was trained with.'):
    train.train_and_evaluate(config, stage1)


@pytest.mark.parametrize('overrides, diff', [
    ({'batch_size': 16}, 'batch_size: 32 -> 16'),
    ({'image_size': 36, 'input.scale_min': 36, 'input.scale_max': 36,
      'input.eval_resize': 36}, 'image_size: 32 -> 36'),
    ({'seed': 1}, 'seed: 0 -> 1'),
])
def test_other_data_or_batches_are_refused(stage1, data_dir, overrides, diff):
  # Regression: only model fields were compared; these resumed silently and
  # overwrote config.json.
  config = tiny_config(data_dir, num_epochs=2, **{'freeze': STAGE1['freeze']}, **overrides)
  with pytest.raises(ValueError, match=rf'holds a run with other data or batches \({diff}'):
    train.train_and_evaluate(config, stage1)
  with open(os.path.join(stage1, 'config.json')) as f:
    assert '"batch_size": 32' in f.read()


def test_a_run_saved_before_fields_existed_resumes_as_it_was(tmp_path):
  # config.json of a run trained before model.init, input.color_shift and the
  # plateau fields existed: they are read as their defaults, so nothing is
  # refused or noted (before: "holds a run of a different model (model.init:
  # None -> 'default')").
  from vgg_flax.io import storage  # pylint: disable=g-import-not-at-top
  from vgg_flax.training import preflight  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  config = tiny_config(tmp_path / 'data')
  saved = json.loads(config.to_json_best_effort())
  del saved['model']['init'], saved['input']['color_shift'], saved['schedule']['patience']
  workdir = tmp_path / 'old_run'
  storage.write_json(workdir / workdirs.CONFIG_FILE, saved)
  assert preflight.check_workdir(str(workdir), config) == ()
  config.model.init = 'paper'  # The initialiser does not change what a checkpoint holds.
  assert preflight.check_workdir(str(workdir), config) == ('model.init',)


def test_the_memory_levers_may_change_between_launches(tmp_path, caplog):
  # Remat and the state's layout change no result: free, as dtype is; a sharded
  # state restores onto either layout (sharded_state_test.py). Accumulation
  # changes BatchNorm's statistics: allowed, and named.
  from vgg_flax.io import storage  # pylint: disable=g-import-not-at-top
  from vgg_flax.training import preflight  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  config = tiny_config(tmp_path / 'data')
  workdir = tmp_path / 'run'
  storage.write_json(workdir / workdirs.CONFIG_FILE, json.loads(config.to_json_best_effort()))
  config.model.remat, config.state_sharding, config.grad_accum_steps = 'block', 'fsdp', 2
  changed = preflight.check_workdir(str(workdir), config)
  assert changed == ('grad_accum_steps', 'model.remat', 'state_sharding')
  warnings = [r.getMessage() for r in caplog.records if r.levelname == 'WARNING']
  assert warnings == [f'Resuming {workdir} with other training settings than before '
                      '(grad_accum_steps: 1 -> 2).'], warnings
