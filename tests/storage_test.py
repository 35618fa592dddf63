"""vgg_flax.io.storage and the run files written through it, locally and on a GCS server."""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from vgg_flax.interop import keras_weights
from vgg_flax.interop import transfer
from vgg_flax.interop import weights
from vgg_flax.io import run_config
from vgg_flax.io import storage
from vgg_flax.io import workdirs
from vgg_flax.training import reporting


@pytest.fixture(params=['local', 'gcs'])
def root(request, tmp_path):
  if request.param == 'local':
    yield str(tmp_path / 'run')
    return
  yield request.getfixturevalue('gcs_bucket') + '/runs/r1'
  # A gs:// path mistaken for a local one would leave a 'gs:' folder behind.
  assert not [n for n in os.listdir('.') + os.listdir(tmp_path) if n.startswith('gs:')]


def _objects(url):
  """Every object under a gs:// prefix, as paths relative to it."""
  prefix = storage.path(url)
  fs = prefix._backend.fs(os.fspath(prefix))  # pylint: disable=protected-access
  fs.invalidate_cache()
  base = os.fspath(prefix)[len('gs://'):]
  return sorted(p[len(base) + 1:] for p in fs.find(base))


def test_path_keeps_buckets_and_makes_local_paths_absolute():
  assert os.fspath(storage.path('gs://b/runs/x')) == 'gs://b/runs/x'
  assert os.fspath(storage.path('runs/x')) == os.path.join(os.getcwd(), 'runs/x')
  assert storage.is_remote('gs://b/x') and not storage.is_remote('/tmp/x')


def test_text_and_json_round_trip(root):
  storage.makedirs(root)
  storage.write_json(f'{root}/config.json', {'model': {'depth': 11}, 'lr': 0.1})
  storage.write_text(f'{root}/notes/a.txt', 'héllo\n')
  assert storage.read_json(f'{root}/config.json') == {'model': {'depth': 11}, 'lr': 0.1}
  assert storage.read_text(f'{root}/notes/a.txt') == 'héllo\n'
  assert storage.listdir(root) == ['config.json', 'notes']
  assert storage.isfile(f'{root}/config.json') and storage.isdir(f'{root}/notes')
  storage.write_text(f'{root}/notes/a.txt', 'new')  # Overwrite, no temporary left behind.
  assert storage.listdir(f'{root}/notes') == ['a.txt']
  storage.remove(f'{root}/notes/a.txt')
  assert not storage.exists(f'{root}/notes/a.txt')
  assert storage.listdir(f'{root}/missing') == []


def test_check_writable_probes_and_cleans_up(root, monkeypatch):
  probe = f'{root}/.write_test.0'
  storage.makedirs(root)
  storage.write_text(probe, 'left by a killed trainer')
  storage.check_writable(root, probe='.write_test.0')  # Writes it again, then deletes it.
  assert not storage.exists(probe) and storage.listdir(root) == []
  # The probe is read back: storage that keeps other bytes than it was given is refused.
  monkeypatch.setattr(storage, 'read_bytes', lambda p: b'other bytes')
  with pytest.raises(OSError, match=re.escape(
      f'folder {root} is not writable (the probe file read back differs from what was '
      'written).')):
    storage.check_writable(root, probe='.write_test.0')


def test_check_writable_names_an_unwritable_folder():
  with pytest.raises(OSError, match=r'^workdir /proc/vgg_flax_run is not writable \(.+\)\.$'):
    storage.check_writable('/proc/vgg_flax_run', subject='workdir')


def test_check_writable_names_a_missing_bucket(gcs_server):
  with pytest.raises(OSError) as e:
    storage.check_writable('gs://no-such-bucket-7f3a/runs/x', subject='workdir',
                           hint='Choose another --workdir.')
  assert str(e.value) == (
      'workdir gs://no-such-bucket-7f3a/runs/x is not writable (bucket gs://no-such-bucket-7f3a does '
      'not exist, or these credentials cannot see it). Choose another --workdir.')
  assert not storage.exists('gs://no-such-bucket-7f3a')  # Not created by the probe.


def test_free_bytes(tmp_path):
  assert storage.free_bytes('gs://b/runs/x') is None
  free = storage.free_bytes(tmp_path / 'not' / 'yet')
  assert isinstance(free, int) and free > 0


def test_metrics_rows_and_resume(root):
  path = f'{root}/metrics.jsonl'
  writer = reporting.JsonlWriter(path)
  for step in (10, 20, 30):
    writer.write_scalars(step, {'train_loss': 1.0 / step})
  writer.close()
  assert [r['step'] for r in reporting.read_metrics(path)] == [10, 20, 30]
  writer = reporting.JsonlWriter(path, resume_step=20)  # Resumed at 20: row 30 again.
  writer.write_scalars(30, {'train_loss': 0.5})
  writer.flush()
  assert reporting.read_metrics(path) == [
      {'step': 10, 'train_loss': 0.1}, {'step': 20, 'train_loss': 0.05},
      {'step': 30, 'train_loss': 0.5}]
  writer.close()


def test_bucket_append_file_uploads_at_most_once_per_interval(gcs_bucket):
  path = f'{gcs_bucket}/m.jsonl'
  f = storage.AppendFile(path, min_interval_s=3600)
  f.write(b'a\n')  # The first write uploads.
  f.write(b'b\n')  # Within the interval: kept in memory.
  assert storage.read_bytes(path) == b'a\n'
  f.flush()
  assert storage.read_bytes(path) == b'a\nb\n'
  f.write(b'c\n')
  f.close()
  assert storage.read_bytes(path) == b'a\nb\nc\n'


def _tensorboard_scalars(logdir):
  from tensorboard.backend.event_processing import plugin_event_accumulator  # pylint: disable=g-import-not-at-top
  from tensorboard.util import tensor_util  # pylint: disable=g-import-not-at-top
  accumulator = plugin_event_accumulator.EventAccumulator(str(logdir))
  accumulator.Reload()
  return {tag: [(e.step, tensor_util.make_ndarray(e.tensor_proto).item())
                for e in accumulator.Tensors(tag)]
          for tag in accumulator.Tags()['tensors']}


def test_tensorboard_events_land_in_the_bucket(gcs_bucket, tmp_path):
  rows = [(1, {'train_loss': 2.5, 'train_accuracy': 0.25}), (2, {'eval_loss': 1.5})]
  runs = {'local': str(tmp_path / 'local'), 'gcs': f'{gcs_bucket}/runs/tb'}
  for workdir in runs.values():
    writer = reporting.create_writer(workdir)
    for step, scalars in rows:
      writer.write_scalars(step, scalars)
    writer.close()
  objects = _objects(runs['gcs'])
  assert objects[-1] == 'metrics.jsonl'
  events = [o for o in objects if 'tfevents' in o]
  assert len(events) == 1 and objects == sorted(events + ['metrics.jsonl'])
  downloaded = tmp_path / 'downloaded'
  downloaded.mkdir()
  (downloaded / events[0]).write_bytes(storage.read_bytes(f'{runs["gcs"]}/{events[0]}'))
  expected = {'train_loss': [(1, 2.5)], 'train_accuracy': [(1, 0.25)], 'eval_loss': [(2, 1.5)]}
  assert _tensorboard_scalars(downloaded) == expected
  assert _tensorboard_scalars(runs['local']) == expected  # As clu's writer does locally.
  assert (reporting.read_metrics(f'{runs["gcs"]}/metrics.jsonl')
          == reporting.read_metrics(f'{runs["local"]}/metrics.jsonl'))


def test_curves_png(root):
  writer = reporting.JsonlWriter(f'{root}/metrics.jsonl')
  for step in range(1, 4):
    writer.write_scalars(step, {'train_loss': 1.0 / step, 'train_accuracy': step / 10})
  writer.close()
  reporting.plot_curves(f'{root}/metrics.jsonl', f'{root}/curves.png')
  png = storage.read_bytes(f'{root}/curves.png')
  assert png[:8] == b'\x89PNG\r\n\x1a\n' and len(png) > 5000


def test_orbax_checkpoint_round_trip_and_restore_for_init_from(root):
  """The layout and calls of vgg_flax.training.checkpoint, then transfer's read of it."""
  state = {'step': jnp.asarray(3), 'params': {'fc': {'kernel': jnp.arange(6.0).reshape(2, 3)}},
           'batch_stats': {'bn': {'mean': jnp.ones(3)}}}
  manager = ocp.CheckpointManager(
      storage.path(root) / 'checkpoints' / 'latest', item_names=('state', 'meta'),
      options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))
  manager.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          meta=ocp.args.JsonSave({'best': 0.5})))
  manager.wait_until_finished()
  manager.close()
  manager = ocp.CheckpointManager(storage.path(root) / 'checkpoints' / 'latest',
                                  item_names=('state', 'meta'))
  assert manager.all_steps() == [3]
  restored = manager.restore(3, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(jax.tree.map(ocp.utils.to_shape_dtype_struct, state)),
      meta=ocp.args.JsonRestore()))
  np.testing.assert_array_equal(restored['state']['params']['fc']['kernel'],
                                state['params']['fc']['kernel'])
  assert restored['meta'] == {'best': 0.5}
  state_dir = transfer.find_checkpoint(root, 'best')  # Falls back to latest.
  assert state_dir == os.fspath(storage.path(root) / 'checkpoints/latest/3/state')
  variables = transfer.restore_checkpoint_variables(state_dir)
  np.testing.assert_array_equal(variables['batch_stats']['bn']['mean'], np.ones(3))


def test_weights_files_read_from_a_bucket(gcs_bucket, tmp_path):
  import h5py  # pylint: disable=g-import-not-at-top
  kernel = np.arange(12, dtype=np.float32).reshape(2, 2, 1, 3)
  np.savez(tmp_path / 'w.npz', **{'features.0.weight': kernel})
  with h5py.File(tmp_path / 'w.h5', 'w') as f:  # The legacy Keras weights layout.
    layer = f.create_group('block1_conv1')
    layer.attrs['weight_names'] = [b'block1_conv1/kernel:0']
    layer['block1_conv1/kernel:0'] = kernel
    f.attrs['layer_names'] = [b'block1_conv1']
  for name in ('w.npz', 'w.h5'):
    storage.write_bytes(f'{gcs_bucket}/{name}', (tmp_path / name).read_bytes())
  tensors, _ = weights.read_torchvision(f'{gcs_bucket}/w.npz')
  np.testing.assert_array_equal(tensors['features.0.weight'], kernel)
  np.testing.assert_array_equal(keras_weights.read_keras(f'{gcs_bucket}/w.h5')['block1_conv1/kernel'],
                                kernel)


def test_evaluate_reads_the_run_files_of_a_bucket_workdir(gcs_bucket):
  workdir = f'{gcs_bucket}/runs/done'
  with pytest.raises(FileNotFoundError, match=f'{workdir}/config.json does not exist'):
    run_config.load_config(workdir)
  storage.write_json(f'{workdir}/config.json', {'batch_size': 8, 'model': {'depth': 13}})
  storage.write_json(f'{workdir}/dataset.json', {'num_model_classes': 10})
  config = run_config.load_config(workdir)
  assert (config.batch_size, config.model.depth) == (8, 13)
  assert 'eval' in config  # Filled in from the base config.
  assert workdirs.Workdir(workdir).read_dataset() == {'num_model_classes': 10}
