"""The sweep runner: planning and validation, skip and retry, aggregation, the CLI."""

import csv
import logging
import os
import pathlib
import subprocess

import ml_collections
import numpy as np
import pytest

from vgg_flax.io import run_config
from vgg_flax.io import workdirs
from vgg_flax import sweep
from vgg_flax import train

from helpers import ROOT, metrics_text, python

TESTS = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope='module')
def data_dir(digits):
  return pathlib.Path(digits)


def _base_file(tmp_path, data_dir) -> str:
  """A config file with the tests' tiny VGG, one epoch of 6 steps."""
  path = tmp_path / 'tiny.py'
  path.write_text(
      'import sys\n'
      f'sys.path.insert(0, {TESTS!r})\n'
      'from helpers import tiny_config\n\n'
      'def get_config():\n'
      f'  return tiny_config({str(data_dir)!r}, num_epochs=1, log_every_steps=2,\n'
      "                     train_split='train[:192]')\n")
  return str(path)


def _sweep(base: str, **fields) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.title = 'tiny'
  config.base = base
  config.fixed = (('model.fc_dim', 16),)
  config.axes = (sweep.axis('depth', 'model.depth', (11, 13)),)
  config.seeds = (0, 1)
  for k, v in fields.items():
    config[k] = v
  return config


def _in_process(calls):
  """A launcher that trains in this process (no interpreter start-up per run)."""
  def launcher(run, base):
    calls.append(run.workdir)
    config = run_config.apply_overrides(sweep.load_config_file(base), run.overrides)
    train.train_and_evaluate(config, run.workdir)
    return 0
  return launcher


def test_plan_is_the_product_of_axes_and_seeds(tmp_path, data_dir):
  config = _sweep(_base_file(tmp_path, data_dir), axes=(
      sweep.axis('depth', 'model.depth', (11, 16)),
      sweep.named_axis('net', (('3x3', {'model.kernel_size': 3}),
                               ('5x5 wide', {'model.kernel_size': 5, 'model.width': 16})))))
  runs = sweep.plan(config, str(tmp_path / 'sweep'))
  assert len(runs) == 2 * 2 * 2
  assert [r.seed for r in runs[:2]] == [0, 1]
  last = runs[-1]
  assert last.labels == {'depth': '16', 'net': '5x5 wide'}
  assert last.overrides == {'model.fc_dim': 16, 'model.depth': 16, 'model.kernel_size': 5,
                            'model.width': 16, 'seed': 1}
  assert last.workdir == str(tmp_path / 'sweep' / 'depth=16,net=5x5_wide' / 'seed1')
  assert last.command('configs/x.py')[3:] == ['--config=configs/x.py',
      f'--workdir={last.workdir}', '--config.model.fc_dim=16', '--config.model.depth=16',
      '--config.model.kernel_size=5', '--config.model.width=16', '--config.seed=1']


@pytest.mark.parametrize('fields, message', [
    (dict(axes=(sweep.axis('depth', 'model.depth', (11, 12)),)),
     r'sweep point depth=12: config.model.depth=12 is not allowed: expected one of 11, 13'),
    (dict(axes=(sweep.axis('k', 'model.kernel', (3,)),)),
     r"sweep point k=3: --config.model.kernel: the run config has no field 'model.kernel'"),
    (dict(seeds=(0, 0)), r'sweep config: seeds=\(0, 0\) repeats a seed'),
    (dict(seeds=()), r"sweep config: field 'seeds' is missing or empty"),
])
def test_bad_sweeps_fail_before_training(tmp_path, data_dir, fields, message):
  with pytest.raises(ValueError, match=message):
    sweep.plan(_sweep(_base_file(tmp_path, data_dir), **fields), str(tmp_path / 'sweep'))
  assert not os.path.exists(tmp_path / 'sweep')


def test_runs_skips_finished_retries_failed_and_reports(tmp_path, data_dir):
  config = _sweep(_base_file(tmp_path, data_dir))
  runs = sweep.plan(config, str(tmp_path / 'sweep'))
  calls = []
  good = _in_process(calls)

  def flaky(run, base):  # depth 13, seed 1 fails the first time.
    return 1 if run.labels['depth'] == '13' and run.seed == 1 else good(run, base)

  failed = sweep.run_all(runs, config.base, log=lambda _: None, launcher=flaky)
  assert [(r.labels['depth'], r.seed) for r in failed] == [('13', 1)]
  assert len(calls) == 3
  # Again: the three finished runs are skipped, the failed one is trained.
  calls.clear()
  assert sweep.run_all(runs, config.base, log=lambda _: None, launcher=good) == []
  assert calls == [runs[3].workdir]

  summary = sweep.report(config, runs, str(tmp_path / 'report'))
  with open(tmp_path / 'report' / sweep.CSV_FILE) as f:
    rows = list(csv.DictReader(f))
  assert [(r['depth'], r['seed']) for r in rows] == [('11', '0'), ('11', '1'), ('13', '0'),
                                                     ('13', '1')]
  for point, depth in zip(summary, ('11', '13')):
    accs = [float(r['eval_accuracy']) for r in rows if r['depth'] == depth]
    assert point['accuracy_mean'] == pytest.approx(np.mean(accs))
    assert point['accuracy_std'] == pytest.approx(np.std(accs, ddof=1))
    assert point['seeds'] == 2
  assert summary[1]['num_params'] > summary[0]['num_params']  # VGG-13 has two more convs.
  table = (tmp_path / 'report' / sweep.TABLE_FILE).read_text()
  mean, std = 100 * summary[0]['accuracy_mean'], 100 * summary[0]['accuracy_std']
  assert f'| 11 | {summary[0]["num_params"]:,} |' in table
  assert f'{mean:.2f} ± {std:.2f}' in table
  assert os.path.getsize(tmp_path / 'report' / sweep.PLOT_FILE) > 10_000


@pytest.mark.resume
def test_an_interrupted_run_resumes_from_its_checkpoint(tmp_path, data_dir, caplog):
  config = _sweep(_base_file(tmp_path, data_dir), axes=(sweep.axis('depth', 'model.depth', (11,)),),
                  seeds=(0,))
  [run] = sweep.plan(config, str(tmp_path / 'sweep'))
  calls = []
  sweep.run_all([run], config.base, log=lambda _: None, launcher=_in_process(calls))
  result = open(os.path.join(run.workdir, workdirs.RESULT_FILE)).read()
  os.remove(os.path.join(run.workdir, workdirs.RESULT_FILE))  # As if killed before the end.
  before = metrics_text(run.workdir)
  lines = []
  with caplog.at_level(logging.INFO, logger='absl'):
    sweep.run_all([run], config.base, log=lines.append, launcher=_in_process(calls))
  assert len(calls) == 2 and run.done
  assert 'training in' in lines[0]  # Not skipped: it had not finished.
  assert lines[1].endswith(' 1/1 runs (100%), ETA 0m00s'), lines  # Progress with an ETA.
  # The trainer found step 6 of 6 in the checkpoint: nothing was trained again,
  # and the result it completed is the one the run wrote.
  assert 'Resumed from step 6 of' in caplog.text
  assert 'already finished at step 6; nothing to train' in caplog.text
  assert metrics_text(run.workdir) == before
  assert open(os.path.join(run.workdir, workdirs.RESULT_FILE)).read() == result


def test_cli_prints_one_command_per_run(tmp_path, data_dir):
  base = _base_file(tmp_path, data_dir)
  sweep_file = tmp_path / 'sweep.py'
  sweep_file.write_text(
      'import ml_collections\nfrom vgg_flax import sweep\n\n'
      'def get_config():\n'
      '  c = ml_collections.ConfigDict()\n'
      f'  c.base = {base!r}\n'
      "  c.axes = (sweep.axis('depth', 'model.depth', (11, 19)),)\n"
      '  c.seeds = (0, 1, 2)\n'
      '  return c\n')
  out = subprocess.run([python(), '-m', 'vgg_flax.sweep', f'--config={sweep_file}',
                        f'--workdir={tmp_path / "w"}', '--print_commands'],
                       capture_output=True, text=True, cwd=ROOT, check=True).stdout.splitlines()
  assert len(out) == 6
  assert out[-1] == (f'python -m vgg_flax.train --config={base} '
                     f'--workdir={tmp_path / "w" / "depth=19" / "seed2"} '
                     '--config.model.depth=19 --config.seed=2')
  assert not os.path.exists(tmp_path / 'w')


def test_a_result_of_other_settings_is_not_taken_as_finished(tmp_path, data_dir):
  # Regression: any result.json counted as done, so changing the sweep's fixed
  # values or num_epochs reported the old runs as if they had the new settings.
  base = _base_file(tmp_path, data_dir)
  one = dict(axes=(sweep.axis('depth', 'model.depth', (11,)),), seeds=(0,))
  [run] = sweep.plan(_sweep(base, **one), str(tmp_path / 'sweep'))
  calls = []
  sweep.run_all([run], base, log=lambda _: None, launcher=_in_process(calls))
  assert run.done and len(calls) == 1
  # More epochs: the run resumes from its checkpoint and trains epoch 2.
  [longer] = sweep.plan(_sweep(base, fixed=(('model.fc_dim', 16), ('num_epochs', 2)), **one),
                        str(tmp_path / 'sweep'))
  assert not longer.done
  assert sweep.run_all([longer], base, log=lambda _: None, launcher=_in_process(calls)) == []
  assert len(calls) == 2 and longer.done
  with open(os.path.join(run.workdir, 'metrics.jsonl')) as f:
    assert sum('train_loss' in line for line in f) == 6
  # Another learning rate: refused by name, nothing trained, kept out of the report.
  [other] = sweep.plan(_sweep(base, fixed=(('model.fc_dim', 16), ('num_epochs', 2),
                                           ('learning_rate', 0.01)), **one),
                       str(tmp_path / 'sweep'))
  lines = []
  assert sweep.run_all([other], base, log=lines.append, launcher=_in_process(calls)) == [other]
  assert len(calls) == 2 and not other.done
  assert ('was trained with other settings (learning_rate: 0.003 -> 0.01); move '
          f'{other.workdir} away to train it again, or use another --workdir.') in lines[0]
  assert sweep.collect([other]) == []
  # Fewer epochs: refused too. Regression: the 2-epoch run counted as done under
  # num_epochs=1 (result.json relabelled, the report took its accuracy).
  [shorter] = sweep.plan(_sweep(base, fixed=(('model.fc_dim', 16), ('num_epochs', 1)), **one),
                         str(tmp_path / 'sweep'))
  lines = []
  assert sweep.run_all([shorter], base, log=lines.append, launcher=_in_process(calls)) == [shorter]
  assert len(calls) == 2 and not shorter.done
  assert 'was trained with other settings (num_epochs: 2 -> 1); move' in lines[0]
  assert sweep.collect([shorter]) == []


def test_a_sweep_on_a_bucket(tmp_path, data_dir, gcs_server):
  # Run folders, train.log and the report in gs://, read back by the report.
  import gcs  # pylint: disable=g-import-not-at-top
  from vgg_flax.io import storage  # pylint: disable=g-import-not-at-top
  base = _base_file(tmp_path, data_dir)
  config = _sweep(base, axes=(sweep.axis('depth', 'model.depth', (11,)),), seeds=(0,))
  root = gcs_server.create_bucket('sweeps') + '/tiny'
  runs = sweep.plan(config, root)
  assert sweep.run_all(runs, base, log=lambda _: None) == []  # The real launcher: a subprocess.
  assert runs[0].done
  assert 'Training VGG for 6 steps' in storage.read_text(runs[0].workdir + '/' + workdirs.LOG_FILE)
  [summary] = sweep.report(config, runs, root)
  assert set(storage.listdir(root)) >= {sweep.CSV_FILE, sweep.TABLE_FILE, sweep.PLOT_FILE}
  rows = list(csv.DictReader(storage.read_text(f'{root}/{sweep.CSV_FILE}').splitlines()))
  assert float(rows[0]['eval_accuracy']) == pytest.approx(summary['accuracy_mean'])
  assert gcs.local_leftovers(ROOT) == [] and gcs.local_leftovers(str(tmp_path)) == []
