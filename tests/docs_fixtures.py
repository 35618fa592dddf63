"""The files the pages of README.md and docs/ read, made in a page's folder.

Each is named by a `<!-- test: setup NAME -->` directive (tests/docs_test.py).
Weights are random and small (width 8, 64-wide FC layers): the pages show the
mechanics, the interop tests check the numbers.
Each takes the page's folder and the environment its commands run in.
"""

import os
import subprocess

import numpy as np
from PIL import Image

CLASSES = {'red': (200, 40, 40), 'green': (40, 180, 60), 'blue': (40, 60, 200)}


def images(folder: str, env: dict[str, str], train: int = 16, test: int = 6) -> None:
  """images/{train,test}/<class>/<i>.jpg: 3 classes of noisy coloured squares."""
  del env  # It runs no command.
  rng = np.random.RandomState(0)
  for split, count in (('train', train), ('test', test)):
    for name, colour in CLASSES.items():
      path = os.path.join(folder, 'images', split, name)
      os.makedirs(path, exist_ok=True)
      for i in range(count):
        pixels = np.clip(np.array(colour) + rng.randn(48, 48, 3) * 40, 0, 255)
        Image.fromarray(pixels.astype(np.uint8)).save(os.path.join(path, f'{i}.jpg'))


def torchvision_vgg16(folder: str, env: dict[str, str]) -> None:
  """vgg16-397923af.pth: torchvision's file name, a torchvision-layout VGG-16 of width 8."""
  del env  # It runs no command.
  import torch  # pylint: disable=g-import-not-at-top
  from weights_export_test import torchvision_vgg  # pylint: disable=g-import-not-at-top
  model = torchvision_vgg('D', width=8, fc_dim=64, num_classes=1000)
  torch.save(model.state_dict(), os.path.join(folder, 'vgg16-397923af.pth'))


def keras_files(folder: str, env: dict[str, str]) -> None:
  """Keras tutorial VGGs: my_tutorial_vgg.keras and tutorial.keras (a Sequential VGG-16
  with a Flatten-Dense head), vgg16.weights.h5 (a VGG-16 with a global-pool head, weights
  only: a file that cannot say its head)."""
  del env  # It runs no command.
  os.environ.setdefault('KERAS_BACKEND', 'jax')
  import keras  # pylint: disable=g-import-not-at-top
  from keras_import_test import sequential_fc  # pylint: disable=g-import-not-at-top
  keras.utils.set_random_seed(0)
  model = sequential_fc(3)
  model.save(os.path.join(folder, 'my_tutorial_vgg.keras'))
  model.save(os.path.join(folder, 'tutorial.keras'))
  gap = keras.Sequential([keras.Input((32, 32, 3))])
  for convs, width in zip((2, 2, 3, 3, 3), (8, 16, 32, 64, 64)):
    for _ in range(convs):
      gap.add(keras.layers.Conv2D(width, 3, padding='same', activation='relu'))
    gap.add(keras.layers.MaxPooling2D())
  gap.add(keras.layers.GlobalAveragePooling2D())
  gap.add(keras.layers.Dense(10))
  gap.save_weights(os.path.join(folder, 'vgg16.weights.h5'))


def photos(folder: str, env: dict[str, str]) -> None:
  """china.jpg and flower.jpg: scikit-learn's two sample photographs."""
  del env  # It runs no command.
  from sklearn.datasets import load_sample_image  # pylint: disable=g-import-not-at-top
  for name in ('china.jpg', 'flower.jpg'):
    Image.fromarray(load_sample_image(name)).save(os.path.join(folder, name))


def _train(folder: str, env: dict[str, str], workdir: str, config: str, *overrides: str) -> None:
  """A tiny run of `config` in `workdir`: width 8, one epoch on 64 digits, as a page runs it."""
  subprocess.run(
      ['python', '-m', 'vgg_flax.train', f'--config={config}', f'--workdir={workdir}',
       '--config.model.width=8', '--config.model.fc_dim=32', '--config.model.conv_impl=xla',
       '--config.train_split=train[:64]', '--config.batch_size=16', '--config.num_epochs=1',
       *overrides],
      cwd=folder, env=env, check=True,
      capture_output=True, timeout=300)


def vgg16_digits_run(folder: str, env: dict[str, str]) -> None:
  """runs/vgg16_digits: `make train`'s run, as a 4-step VGG-16-BN of width 8."""
  _train(folder, env, 'runs/vgg16_digits', 'configs/default.py')


def depth_sweep_run(folder: str, env: dict[str, str]) -> None:
  """runs/sweeps/depth/depth=16/seed0: the depth sweep's VGG-16, tiny."""
  _train(folder, env, 'runs/sweeps/depth/depth=16/seed0', 'configs/ablation.py',
         '--config.model.depth=16')


def tiny_depth_sweep(folder: str, env: dict[str, str]) -> None:
  """tiny_depth.py: configs/sweeps/depth.py at tiny size, depths 11 and 13, one seed."""
  del env  # It runs no command.
  with open(os.path.join(folder, 'tiny_depth.py'), 'w', encoding='utf-8') as f:
    f.write('''"""configs/sweeps/depth.py at tiny size."""
import importlib.util
spec = importlib.util.spec_from_file_location('depth', 'configs/sweeps/depth.py')
depth = importlib.util.module_from_spec(spec)
spec.loader.exec_module(depth)
from vgg_flax import sweep


def get_config():
  config = depth.get_config()
  config.fixed = (('model.width', 8), ('num_epochs', 1), ('train_split', 'train[:64]'),
                  ('batch_size', 16), ('model.conv_impl', 'xla'))
  config.axes = (sweep.axis('depth', 'model.depth', (11, 13)),)
  config.seeds = (0,)
  return config
''')
