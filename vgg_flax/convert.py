"""Converts torchvision or Keras VGG weights into a folder `init_from` can start from.

  python -m vgg_flax.convert --from=torchvision --input=vgg16-397923af.pth --output=weights/vgg16
  python -m vgg_flax.convert --from=keras --input=vgg16_weights_tf_dim_ordering_tf_kernels.h5 \
      --output=weights/vgg16_keras

Depth and batch_norm are read off the file unless given. The output holds
`variables/` (an orbax PyTree of params and batch_stats) and `weights.json`
(the source, architecture and the `config.input.preset` that goes with it).
"""

from __future__ import annotations

import os

from absl import app
from absl import flags
from absl import logging

from vgg_flax import cli
from vgg_flax import models
from vgg_flax import storage
from vgg_flax import transfer
from vgg_flax import weights

_FROM = flags.DEFINE_enum('from', None, weights.SOURCES, 'Where the weights come from.',
                          required=True)
_INPUT = flags.DEFINE_string('input', None, 'torchvision .pth/.pt/.npz or Keras .h5 file.',
                             required=True)
_OUTPUT = flags.DEFINE_string('output', None, 'Folder to write (config.init_from).',
                              required=True)
_DEPTH = flags.DEFINE_integer('depth', 0, '11, 13, 16 or 19; 0 = read it off the file.')
_BATCH_NORM = flags.DEFINE_bool('batch_norm', None, 'torchvision _bn weights; default: '
                                'read it off the file.')


def convert(source: str, path: str, output: str, depth: int = 0,
            batch_norm: bool | None = None) -> dict:
  """Converts `path` and writes `output`; returns the metadata written."""
  if source == 'torchvision':
    tensors, _ = weights.read_torchvision(path)
    found_depth, found_bn = weights.infer_torchvision(tensors)
    depth = depth or found_depth
    batch_norm = found_bn if batch_norm is None else batch_norm
    variables = weights.from_torchvision(tensors, depth, batch_norm)
  elif source == 'keras':
    depth = depth or weights.infer_keras_depth(path)
    batch_norm = False
    variables = weights.from_keras(path, depth)
  else:
    raise ValueError(f'--from={source!r} is not allowed: expected one of {weights.SOURCES}.')
  params = variables['params']
  meta = {
      'source': source, 'input': os.fspath(storage.path(path)), 'depth': depth,
      'batch_norm': bool(batch_norm), 'include_top': 'fc1' in params,
      'num_classes': int(params['predictions']['bias'].shape[0]) if 'predictions' in params
                     else None,
      'fc1_inputs': int(params['fc1']['kernel'].shape[0]) if 'fc1' in params else None,
      'preset': weights.PRESET[source], 'num_params': models.count_params(params),
  }
  transfer.save_converted(variables, output, meta)
  return meta


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  meta = convert(_FROM.value, _INPUT.value, _OUTPUT.value, _DEPTH.value, _BATCH_NORM.value)
  logging.info('Wrote %s', _OUTPUT.value)
  print(f'Converted {meta["source"]} VGG-{meta["depth"]}{"-BN" if meta["batch_norm"] else ""} '
        f'({meta["num_params"]:,} parameters, top: {meta["include_top"]}) to {_OUTPUT.value}.\n'
        f'Train from it with --config.init_from={_OUTPUT.value} '
        f'--config.input.preset={meta["preset"]}')


if __name__ == '__main__':
  cli.run(main)
