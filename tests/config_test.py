"""Every config file loads and validates; bad values are named with what is allowed."""

import collections
import glob
import importlib.util
import os

import pytest

from vgg_flax import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(glob.glob(os.path.join(ROOT, 'configs', '*.py')))


def load(path):
  spec = importlib.util.spec_from_file_location('cfg', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_every_paper_depth_has_a_config():
  names = {os.path.basename(p) for p in CONFIG_FILES}
  assert {'default.py', 'vgg11.py', 'vgg13.py', 'vgg16.py', 'vgg19.py'} <= names


@pytest.mark.parametrize('path', CONFIG_FILES, ids=os.path.basename)
def test_config_files_validate(path):
  module = load(path)
  config_lib.validate(module.get_config())
  assert 'python -m vgg_flax.train --config=configs/' in module.__doc__  # How to run it.


@pytest.mark.parametrize('depth', [11, 13, 16, 19])
@pytest.mark.parametrize('stage, scales, lr, parent', [
    ('', (256, 512), 1e-2, None), ('s256', (256, 256), 1e-2, None),
    ('s384', (384, 384), 1e-3, 's256'), ('multiscale', (256, 512), 1e-3, 's384'),
])
def test_paper_recipe(depth, stage, scales, lr, parent):
  module = load(os.path.join(ROOT, 'configs', f'vgg{depth}.py'))
  config = module.get_config(stage)
  assert config.model.depth == depth
  assert (config.optimizer, config.momentum, config.batch_size) == ('sgd', 0.9, 256)
  assert (config.weight_decay, config.learning_rate, config.model.dropout_rate) == (5e-4, lr, 0.5)
  assert (config.schedule.name, config.schedule.factor) == ('plateau', 0.1)
  assert config.checkpoint.monitor == 'eval_accuracy'  # The paper's validation accuracy.
  assert (config.image_size, config.input.scale_min, config.input.scale_max) == (224, *scales)
  assert config.input.flip and config.input.color_shift == 0.1
  assert config.dataset == 'imagenet2012'
  assert (config.eval.mode, config.eval.at_end) == ('dense', True)
  # The chain: each stage starts from the workdir of the previous stage's command.
  name = f'vgg{depth}' + (f'_{stage}' if stage else '')
  assert f'--config=configs/vgg{depth}.py{":" + stage if stage else ""} --workdir=runs/{name} ' \
      in module.__doc__
  if parent:
    assert config.init_from == f'runs/vgg{depth}_{parent}'
    assert f'--config=configs/vgg{depth}.py:{parent} --workdir={config.init_from} ' \
        in module.__doc__
  else:
    assert config.init_from == ''
  # The rate never goes below the paper's last one, 1e-5: three drops from 1e-2, two from 1e-3.
  assert lr * config.schedule.min_scale == pytest.approx(1e-5)
  with pytest.raises(ValueError, match=rf"configs/vgg{depth}.py:s512: expected one of 's256', "
                     r"'s384', 'multiscale' \(or none\)."):
    module.get_config('s512')


def _shipped_configs():
  """(id, config) of every config file, and of every stage of the ImageNet ones."""
  for path in CONFIG_FILES:
    module = load(path)
    name = os.path.basename(path)
    yield name, module.get_config()
    if name.startswith('vgg'):
      for stage in ('s256', 's384', 'multiscale'):
        yield f'{name}:{stage}', module.get_config(stage)


def test_a_dry_run_of_every_shipped_config_validates():
  # No dataset anywhere: the config validates and the train state builds abstractly.
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from vgg_flax.training import step as step_lib  # pylint: disable=g-import-not-at-top
  mesh = step_lib.create_mesh()
  names, built = [], set()
  for name, config in _shipped_configs():
    config_lib.validate(config)
    names.append(name)
    channels = 3 if config.input.preset else len(config.input.mean)
    shapes = (config.model.to_json(), config.optimizer, config.schedule.name, config.freeze,
              config.image_size, channels)
    if shapes in built:  # The stages of a depth share their shapes: traced once.
      continue
    built.add(shapes)
    model, tx, _ = step_lib.create_model_and_optimizer(
        config, config.model.num_classes or 10, steps_per_epoch=100)
    state = step_lib.abstract_train_state(model, tx, config, channels, NamedSharding(mesh, P()))
    assert state.params, name
  assert {'vgg16.py', 'vgg16.py:s256', 'vgg16.py:s384', 'vgg19.py:multiscale'} <= set(names)


@pytest.mark.parametrize('field, value, message', [
    ('model.depth', 12, r"config.model.depth=12 is not allowed: expected one of 11, 13, 16, 19."),
    ('model.kernel_size', 4, r"config.model.kernel_size=4 is not allowed: must be a positive odd"),
    ('model.kernel_size', 0, r"config.model.kernel_size=0 is not allowed: must be a positive odd"),
    ('model.head', 'mlp', r"config.model.head='mlp' is not allowed: expected one of 'fc', 'gap', 'none'."),
    ('model.variant', 'F', r"config.model.variant='F' is not allowed: expected one of ''"),
    ('image_size', 16, r"config.image_size=16 is not allowed: must be >= 32: VGG halves the image five times."),
    ('learning_rate', 0.0, r"config.learning_rate=0.0 is not allowed: must be > 0."),
    ('learning_rate', -1e-3, r"config.learning_rate=-0.001 is not allowed: must be > 0."),
    ('batch_size', 0, r"config.batch_size=0 is not allowed: must be > 0."),
    ('optimizer', 'lamb', r"config.optimizer='lamb' is not allowed: expected one of 'sgd', 'adam', 'adamw'."),
    ('schedule.name', 'linear', r"config.schedule.name='linear' is not allowed: expected one of "
     r"'constant', 'step', 'cosine', 'plateau', 'plateau_train_loss'."),
    ('schedule.patience', 0, r"config.schedule.patience=0 is not allowed: must be an integer >= 1 "
     r"\(evaluations without improvement\)."),
    ('schedule.min_scale', 0.0, r"config.schedule.min_scale=0.0 is not allowed: must be in "
     r"\(0, 1\]."),
    ('model.init', 'glorot', r"config.model.init='glorot' is not allowed: expected one of "
     r"'default', 'paper'."),
    ('input.eval_resize', 100, r"config.input.eval_resize=100 is not allowed: must be >= "
     r"image_size \(224\), or 0 \(from the training scale: S, or the middle of "
     r"\[scale_min, scale_max\]\)."),
    ('input.color_shift', -0.1, r"config.input.color_shift=-0.1 is not allowed: must be >= 0 "
     r"\(0 = off; 0.1 = AlexNet's and the paper's\)."),
    ('input.mean', (77.7,), r"config.input.color_shift=0.1 is not allowed: needs RGB images, "
     r"and input.mean has 1 channel\(s\); set it to 0."),
    ('model.dropout_rate', 1.0, r"config.model.dropout_rate=1.0 is not allowed: must be in \[0, 1\)."),
    ('input.scale_min', 200, r"config.input.scale_min=200 is not allowed: must be >= image_size \(224\)"),
    # Regressions: these passed validation and failed after an epoch, or ran wrongly.
    ('checkpoint.monitor', 'val_accuracy', r"config.checkpoint.monitor='val_accuracy' is not "
     r"allowed: expected one of 'eval_accuracy', 'eval_top5_accuracy', 'eval_loss'."),
    ('checkpoint.mode', 'min', r"config.checkpoint.mode='min' is not allowed: eval_accuracy is "
     r"better when higher: use 'max'."),
    ('seed', -1, r"config.seed=-1 is not allowed: must be an integer in \[0, 2\*\*31\)."),
])
def test_bad_values_are_named(field, value, message):
  config = config_lib.get_base_config()
  config.input.color_shift = 0.1  # The ImageNet configs'.
  if field == 'input.mean':
    config.input.std = (1.0,)
  *parents, leaf = field.split('.')
  target = config
  for p in parents:
    target = target[p]
  target[leaf] = value
  with pytest.raises(ValueError, match=message):
    config_lib.validate(config)


def test_pooling_needs_a_head_that_pools_and_hidden_dims_one_that_has_layers():
  config = config_lib.get_base_config()
  config.model.pooling = 'max'
  with pytest.raises(ValueError, match=r"config.model.pooling='max' is not allowed: only with "
                                       r"model.head 'gap' or 'none'"):
    config_lib.validate(config)
  for head in ('gap', 'none'):
    config.model.head = head
    config_lib.validate(config)
  config.model.hidden_dims = (64, 32)
  with pytest.raises(ValueError, match=r"config.model.hidden_dims=\(64, 32\) is not allowed: "
                                       r"must be None or positive widths, e.g. \(512,\), with "
                                       r"model.head 'fc' or 'gap'"):
    config_lib.validate(config)
  config.model.head = 'gap'
  config_lib.validate(config)
  config.model.gap_hidden_dim = 16
  with pytest.raises(ValueError, match=r'config.model.hidden_dims=\(64, 32\) is not allowed: '
                                       r'set it or model.gap_hidden_dim, not both'):
    config_lib.validate(config)


def test_unknown_key_fails_on_the_locked_config():
  config = config_lib.get_base_config()
  config.lock()
  with pytest.raises(AttributeError, match='dept'):
    config.model.dept = 19


def test_from_net_a_config_loads_the_shared_layers_only():
  module = load(os.path.join(ROOT, 'configs', 'from_net_a.py'))
  config = module.get_config('19')
  config_lib.validate(config)
  assert config.model.depth == 19
  assert config.dont_load == ('^block1_(conv|bn)2/', '^block2_(conv|bn)2/',
                              '^block3_(conv|bn)3/', '^block3_(conv|bn)4/', '^block[45]_')
  assert module.get_config('C').model.variant == 'C'
  with pytest.raises(ValueError, match=r'configs/from_net_a.py:11: expected a deeper net than A'):
    module.get_config('11')


# The points of each sweep file (its docstring says which), each run over seeds 0-2.
SWEEP_POINTS = {'columns.py': 6, 'depth.py': 4, 'depth_from_net_a.py': 3, 'depth_long.py': 4,
                'kernel.py': 4}


def test_every_sweep_file_has_its_count_of_points():
  files = glob.glob(os.path.join(ROOT, 'configs', 'sweeps', '*.py'))
  assert sorted(map(os.path.basename, files)) == sorted(SWEEP_POINTS)


@pytest.mark.parametrize('name', sorted(SWEEP_POINTS))
def test_sweep_files_plan_valid_runs(name, tmp_path):
  from vgg_flax import sweep
  cwd = os.getcwd()
  os.chdir(ROOT)  # A sweep's base config is a path relative to the repository.
  try:
    runs = sweep.plan(sweep.load_config_file(os.path.join('configs', 'sweeps', name)),
                      str(tmp_path))
  finally:
    os.chdir(cwd)
  assert len(runs) == 3 * SWEEP_POINTS[name]
  assert len({r.workdir for r in runs}) == len(runs)  # Each (point, seed) once.
  assert collections.Counter(r.seed for r in runs) == {s: SWEEP_POINTS[name] for s in (0, 1, 2)}
