"""examples/quickstart.ipynb, run in a real Jupyter kernel at tiny size, and its outputs."""

import json
import os
import re
import sys

import nbclient
import nbformat
import pytest

from helpers import ROOT

NOTEBOOK = os.path.join(ROOT, 'examples', 'quickstart.ipynb')
# Set again after the cell tagged `parameters`, as papermill does: 2 epochs of
# 3 steps (8 of the 10 images per class train, 2 are held out). absl at INFO, as
# in a kernel that ran a command line's code: `fit` must keep its lines out.
TINY = """IMAGES_PER_CLASS, WIDTH, BATCH_SIZE, EPOCHS = 10, 8, 8, 2
from absl import logging as absl_logging
absl_logging.set_verbosity(absl_logging.INFO)"""
# After the training cell: INFO was given back; the rest runs at absl's default
# (vgg_flax.load restores with orbax, which logs at INFO).
AFTER_FIT = """print('verbosity after fit:', absl_logging.get_verbosity())
absl_logging.set_verbosity(absl_logging.WARNING)"""
# What the run left in the kernel, for the checks below.
FACTS = """print(json.dumps({
    'eval_steps': [r['step'] for r in history.evals], 'finished': history.result is not None,
    'best': os.listdir(os.path.join(WORKDIR, 'checkpoints', 'best')),
    'top3': [[name for name, _ in vgg_flax.predict_image(WORKDIR, f'runs/new_{s}.png', top_k=3)]
             for s in CLASSES]}))"""
CLASSES = ('circle', 'square', 'triangle')
# Library chatter that must not reach the notebook: absl's log lines (the bar
# replaces them), warnings, orbax.
CHATTER = re.compile(r'^[IWE]\d{4} |INFO|warn|orbax|absl', re.I | re.M)


def _kernel_spec(folder):
  """A kernel of this interpreter, whatever kernels the machine has installed."""
  spec = os.path.join(folder, 'kernels', 'vgg_flax_test')
  os.makedirs(spec)
  with open(os.path.join(spec, 'kernel.json'), 'w') as f:
    json.dump({'argv': [sys.executable, '-m', 'ipykernel_launcher', '-f', '{connection_file}'],
               'display_name': 'vgg_flax test', 'language': 'python'}, f)
  return folder


def _texts(cell):
  """The text a reader sees of a cell's outputs: streams and text/plain."""
  return '\n'.join(o.get('text', '') if o.output_type == 'stream'
                   else o.get('data', {}).get('text/plain', '') for o in cell.get('outputs', []))


@pytest.fixture(scope='module')
def nb(tmp_path_factory):
  """The notebook as the kernel left it, run once (about 30 s) for the tests below."""
  tmp_path = tmp_path_factory.mktemp('notebook')
  nb = nbformat.read(NOTEBOOK, as_version=4)
  where = [i for i, c in enumerate(nb.cells) if 'parameters' in c.metadata.get('tags', [])]
  assert len(where) == 1, 'one cell tagged parameters'
  fit = next(i for i, c in enumerate(nb.cells) if 'vgg_flax.fit(' in c.source)
  nb.cells.insert(fit + 1, nbformat.v4.new_code_cell(AFTER_FIT))
  nb.cells.insert(where[0] + 1, nbformat.v4.new_code_cell(TINY))
  nb.cells.append(nbformat.v4.new_code_cell('import json\n' + FACTS))
  run = tmp_path / 'run'
  run.mkdir()
  with pytest.MonkeyPatch.context() as monkeypatch:
    monkeypatch.setenv('JUPYTER_PATH', _kernel_spec(str(tmp_path / 'jupyter')))
    client = nbclient.NotebookClient(nb, kernel_name='vgg_flax_test', timeout=240,
                                     startup_timeout=60, resources={'metadata': {'path': str(run)}})
    client.execute()  # Starts the kernel, runs every cell (raising on an error), stops it.
  return nb


def test_the_quickstart_notebook_runs_in_a_kernel_and_shows_its_results(nb):
  code = [c for c in nb.cells if c.cell_type == 'code']
  cell = {name: next(c for c in code if marker in c.source) for name, marker in (
      ('summary', 'summary.summarize'), ('fit', 'vgg_flax.fit('), ('after_fit', AFTER_FIT),
      ('curves', 'history.plot()'), ('predict', 'vgg_flax.load('))}
  assert 'Total params: 138,357,544' in _texts(cell['summary'])  # torchvision's VGG-16.

  facts = json.loads(_texts(code[-1]))
  assert facts['eval_steps'] == [3, 6] and facts['finished']
  assert facts['best']  # The best checkpoint's step folder.
  assert all(sorted(top) == sorted(CLASSES) for top in facts['top3'])

  fit = _texts(cell['fit'])
  assert len(re.findall(r'^eval at step \d+: eval_accuracy=', fit, re.M)) == 2, fit
  assert "History('runs/quickstart': 2 evaluations" in fit
  assert _texts(cell['after_fit']).strip() == 'verbosity after fit: 0'  # INFO, as it was.
  assert any('image/png' in o.get('data', {}) for o in cell['curves'].outputs)
  predictions = _texts(cell['predict'])
  for shape in CLASSES:
    assert re.search(rf'^{shape}: \w+ [0-9.]+%, \w+ [0-9.]+%, \w+ [0-9.]+%$', predictions,
                     re.M), predictions

  for c in code:
    assert not [o for o in c.outputs if o.output_type == 'error']
    assert not CHATTER.search(_texts(c)), (c.source, _texts(c))


def test_training_shows_one_bar_that_ends_full(nb):
  """The bar is tqdm's widget (ipywidgets, the test extra), its last state '6/6 steps'."""
  states = nb.metadata['widgets']['application/vnd.jupyter.widget-state+json']['state']
  bars = [s['state'] for s in states.values() if s['model_name'] == 'FloatProgressModel']
  assert len(bars) == 1 and bars[0]['value'] == bars[0]['max'] == 6
  texts = [s['state'].get('value', '').replace('\u2007', ' ')  # tqdm's figure spaces.
           for s in states.values() if s['model_name'] == 'HTMLModel']
  assert any(re.search(r'6/6 steps .*loss=[0-9.]+ accuracy=[0-9.]+', t) for t in texts), texts


def test_config_from_reads_a_config_file_and_names_a_bad_field_at_once(tmp_path, monkeypatch):
  import vgg_flax  # pylint: disable=g-import-not-at-top
  monkeypatch.chdir(tmp_path)  # configs/ is then the checkout's, as from examples/.
  config = vgg_flax.config_from('configs/default.py', {'model.depth': 11, 'num_epochs': '2'})
  assert (config.model.depth, config.num_epochs, config.dataset) == (11, 2, 'digits')
  with pytest.raises(AttributeError, match='dept'):
    config.model.dept = 13  # Locked, as --config is: a typo fails.
  with pytest.raises(KeyError, match=r"no field 'model.dpth'\. Did you mean 'model.depth'\?"):
    vgg_flax.config_from('configs/default.py', {'model.dpth': 11})
  with pytest.raises(ValueError, match=r'model\.depth.*12'):
    vgg_flax.config_from('configs/default.py', {'model.depth': 12})
  with pytest.raises(FileNotFoundError, match='configs/nope.py'):
    vgg_flax.config_from('configs/nope.py')
