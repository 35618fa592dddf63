"""Classifies images with a trained workdir: top-k classes and probabilities.

  python -m vgg_flax.predict --workdir=runs/flowers [--top_k=5] [--checkpoint=latest] \
      photo1.jpg photo2.png

Uses the run's best checkpoint (else its latest), the class names of the
dataset it was trained on (WORKDIR/dataset.json) and the same preprocessing as
its evaluation (resize the smaller side to input.eval_resize, centre crop).
"""

from __future__ import annotations

from typing import Sequence

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np
from vgg_flax.quiet_tf import tf

from vgg_flax import cli
from vgg_flax import evaluate
from vgg_flax import input_pipeline
from vgg_flax import storage


def define_flags() -> None:
  """The CLI's flags; defined only when run as a script (vgg_flax.train defines --workdir)."""
  if 'workdir' not in flags.FLAGS:
    flags.DEFINE_string('workdir', None, 'A training workdir.')
  flags.mark_flag_as_required('workdir')
  flags.DEFINE_integer('top_k', 5, 'Classes to print per image.')
  flags.DEFINE_enum('checkpoint', 'best', ('best', 'latest'), 'Which checkpoint.')


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
  config = evaluate.load_config(workdir)
  dataset = evaluate.load_dataset_info(workdir)
  names = list(dataset['class_names'])
  model, variables, _ = evaluate.restore_model(workdir, config, checkpoint)
  names += [f'class_{i}' for i in range(len(names), dataset['num_model_classes'])]
  images = np.stack([load_image(p, config, dataset['num_channels']) for p in paths])
  variables = {k: v for k, v in variables.items() if v}
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
  for path, top in zip(paths, predict(f.workdir, paths, f.top_k, f.checkpoint)):
    print(path)
    for name, p in top:
      print(f'  {p:7.2%}  {name}')


if __name__ == '__main__':
  cli.run(main, define_flags)
