"""Classifies images with a trained workdir or imported weights: top-k classes.

  python -m vgg_flax.predict --workdir=runs/flowers [--top_k=5] [--checkpoint=latest] \
      photo1.jpg photo2.png
  python -m vgg_flax.predict --weights=vgg16-397923af.pth photo1.jpg   # or a converted folder

A workdir: its best checkpoint (else its latest), the class names of the
dataset it was trained on (WORKDIR/dataset.json) and the same preprocessing as
its evaluation (resize the smaller side to Q, `config.eval_scale`: input.eval_resize,
or derived from the training scale; centre crop; the normalisation constants
recorded in dataset.json).

Weights (`vgg_flax.load`: a converted folder, torchvision or Keras file): the
preprocessing preset of the source (torchvision, or caffe for Keras
Applications; `--preset` to choose), the smaller side resized to 256/224 of
the input size and a centre crop, and for 1000 classes the ImageNet class
names shipped with the package (imagenet_classes.txt, torchvision's names).
"""

from __future__ import annotations

import importlib.resources
from typing import Sequence

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np
from vgg_flax.runtime.quiet_tf import tf

from vgg_flax import config as config_lib
from vgg_flax.data import input_pipeline
from vgg_flax.interop import hub
from vgg_flax.interop import transfer
from vgg_flax.io import run_config
from vgg_flax.io import storage
from vgg_flax.io import workdirs
from vgg_flax.runtime import cli
from vgg_flax.runtime import errors


def define_flags() -> None:
  """The CLI's flags; defined only when run as a script (vgg_flax.train defines --workdir)."""
  if 'workdir' not in flags.FLAGS:
    flags.DEFINE_string('workdir', None, 'A training workdir.')
  flags.DEFINE_string('weights', None, 'Instead of --workdir: a converted folder, or a '
                      'torchvision or Keras weights file (vgg_flax.load).')
  flags.DEFINE_integer('top_k', 5, 'Classes to print per image.')
  flags.DEFINE_enum('checkpoint', 'best', ('best', 'latest'), 'Which checkpoint.')
  flags.DEFINE_enum('preset', None, ('torchvision', 'caffe'), '--weights: the preprocessing; '
                    'default: the one of the weights\' source.')


def imagenet_classes() -> list[str]:
  """The 1000 ImageNet class names, in the order of the classifiers' outputs."""
  text = importlib.resources.files('vgg_flax').joinpath('imagenet_classes.txt').read_text()
  return text.splitlines()


def load_image(path: str, config, num_channels: int) -> np.ndarray:
  """Decodes an image file and applies the evaluation preprocessing."""
  if not storage.exists(path):
    raise FileNotFoundError(f'image {path} does not exist.')
  try:
    image = tf.io.decode_image(storage.read_bytes(path), channels=num_channels,
                               expand_animations=False)
  except tf.errors.InvalidArgumentError as e:
    raise ValueError(f'{path} is not a readable JPEG, PNG, GIF or BMP image: {e.message}') from None
  return input_pipeline.preprocess_for_eval(image, config).numpy()


def predict(workdir: str, paths: Sequence[str], top_k: int = 5, checkpoint: str = 'best',
            ) -> list[list[tuple[str, float]]]:
  """Top-k (class name, probability) for each image, best first."""
  config = run_config.load_config(workdir)
  dataset = workdirs.Workdir(workdir).read_dataset()
  # Normalised as in training: the constants the run recorded (they may have been measured).
  config = input_pipeline.with_constants(config, dataset.get('mean'), dataset.get('std'))
  names = list(dataset['class_names'])
  model, variables, _ = transfer.restore_model(workdir, config, checkpoint)
  names += [f'class_{i}' for i in range(len(names), dataset['num_model_classes'])]
  variables = {k: v for k, v in variables.items() if v}
  return _top_k(model, variables, config, dataset['num_channels'], names, paths, top_k)


def predict_weights(weights: str, paths: Sequence[str], top_k: int = 5,
                    preset: str | None = None) -> list[list[tuple[str, float]]]:
  """Top-k (class name, probability) per image with imported weights (`vgg_flax.load`)."""
  model, variables, info = hub.load_with_info(weights)
  preset = preset or info['preset']
  if not preset:
    raise errors.UsageError(f'{weights}: the preprocessing of these weights is unknown; '
                            'pass --preset=torchvision or --preset=caffe.')
  config = config_lib.get_base_config()
  config.image_size = info['image_size']
  config.input.eval_resize = config_lib.crop_fraction_scale(info['image_size'])
  config.input.preset = preset
  num_classes = model.num_classes
  names = (imagenet_classes() if num_classes == 1000
           else [f'class_{i}' for i in range(num_classes)])
  return _top_k(model, variables, config, info['in_channels'], names, paths, top_k)


def _top_k(model, variables, config, num_channels: int, names: Sequence[str],
           paths: Sequence[str], top_k: int) -> list[list[tuple[str, float]]]:
  """Top-k (class name, probability) for each image file, preprocessed as `config` evaluates."""
  images = np.stack([load_image(p, config, num_channels) for p in paths])
  # The model gives logits, also for a Keras file whose output layer had a softmax.
  probs = np.asarray(jax.nn.softmax(jax.jit(model.apply)(variables, images)))
  k = min(top_k, probs.shape[-1])
  order = np.argsort(-probs, axis=-1)[:, :k]
  return [[(names[i], float(p[i])) for i in row] for p, row in zip(probs, order)]


def main(argv):
  paths = argv[1:]
  if not paths:
    raise app.UsageError('Give one or more image files after the flags.')
  logging.set_verbosity(logging.WARNING)  # Keep orbax and tfds chatter off the output.
  f = flags.FLAGS
  if (f.workdir is None) == (f.weights is None):
    raise errors.UsageError('give exactly one of --workdir (a training run) and --weights.')
  results = (predict(f.workdir, paths, f.top_k, f.checkpoint) if f.workdir
             else predict_weights(f.weights, paths, f.top_k, f.preset))
  for path, top in zip(paths, results):
    print(path)
    for name, p in top:
      print(f'  {p:7.2%}  {name}')


if __name__ == '__main__':
  cli.run(main, define_flags)
