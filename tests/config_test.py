"""Every config file loads and validates; bad values are named with what is allowed."""

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
def test_paper_recipe(depth):
  config = load(os.path.join(ROOT, 'configs', f'vgg{depth}.py')).get_config()
  assert config.model.depth == depth
  assert (config.optimizer, config.momentum, config.batch_size) == ('sgd', 0.9, 256)
  assert (config.weight_decay, config.learning_rate, config.model.dropout_rate) == (5e-4, 1e-2, 0.5)
  assert (config.schedule.name, config.schedule.factor) == ('plateau', 0.1)
  assert (config.image_size, config.input.scale_min, config.input.scale_max) == (224, 256, 512)
  assert config.input.flip and config.dataset == 'imagenet2012'


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
    ('schedule.name', 'linear', r"config.schedule.name='linear' is not allowed"),
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
  *parents, leaf = field.split('.')
  target = config
  for p in parents:
    target = target[p]
  target[leaf] = value
  with pytest.raises(ValueError, match=message):
    config_lib.validate(config)


def test_pooling_needs_the_featureless_head():
  config = config_lib.get_base_config()
  config.model.pooling = 'avg'
  with pytest.raises(ValueError, match=r"config.model.pooling='avg' is not allowed: only with "
                                       r"model.head='none'"):
    config_lib.validate(config)
  config.model.head = 'none'
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


@pytest.mark.parametrize('path', sorted(glob.glob(os.path.join(ROOT, 'configs', 'sweeps', '*.py'))),
                         ids=os.path.basename)
def test_sweep_files_plan_valid_runs(path, tmp_path):
  from vgg_flax import sweep
  cwd = os.getcwd()
  os.chdir(ROOT)  # A sweep's base config is a path relative to the repository.
  try:
    runs = sweep.plan(sweep.load_config_file(path), str(tmp_path))
  finally:
    os.chdir(cwd)
  assert len(runs) >= 12 and len(runs) % 3 == 0 and {r.seed for r in runs} == {0, 1, 2}
