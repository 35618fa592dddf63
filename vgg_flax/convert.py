"""Converts VGG weights between torchvision, Keras and vgg_flax.

Into vgg_flax (a folder `init_from`, `vgg_flax.load` and `predict --weights` read):

  python -m vgg_flax.convert --from=torchvision --input=vgg16-397923af.pth --output=weights/vgg16
  python -m vgg_flax.convert --from=keras --input=my_vgg.keras --output=weights/mine

Out of vgg_flax (a training workdir or a converted folder):

  python -m vgg_flax.convert --to=torchvision --input=runs/vgg16_digits --output=vgg16_bn.pth
  python -m vgg_flax.convert --to=keras --input=runs/vgg16_digits --output=vgg16_bn.weights.h5

The architecture is read off the file or the run (`vgg_flax.load`). A
converted folder holds `variables/` (an orbax PyTree of params and
batch_stats) and `weights.json` (source, architecture, input size and the
`config.input.preset` that goes with the weights).
"""

from __future__ import annotations

import os

from absl import app
from absl import flags
from absl import logging

from vgg_flax.interop import hub
from vgg_flax.interop import name_maps
from vgg_flax.interop import weights_export
from vgg_flax.io import storage
from vgg_flax import models
from vgg_flax.runtime import cli
from vgg_flax.runtime import errors

_FROM = flags.DEFINE_enum('from', None, name_maps.SOURCES, 'Import weights from this framework.')
_TO = flags.DEFINE_enum('to', None, weights_export.TARGETS, 'Export a run or converted folder.')
_INPUT = flags.DEFINE_string('input', None, 'A torchvision .pth/.pt/.npz or Keras .keras/.h5/'
                             '.weights.h5 file (--from); a workdir or converted folder (--to).',
                             required=True)
_OUTPUT = flags.DEFINE_string('output', None, 'The folder (--from) or file (--to) to write.',
                              required=True)
_IMAGE_SIZE = flags.DEFINE_integer('image_size', 0, 'torchvision files: the input side the fc '
                                   'head is for (default 224).')
_CHECKPOINT = flags.DEFINE_enum('checkpoint', 'best', ('best', 'latest'), 'Workdirs: which one.')


def _suffixes(source: str) -> tuple[str, ...]:
  return hub.TORCH_SUFFIXES if source == 'torchvision' else hub.KERAS_SUFFIXES


def convert(source: str, path: str, output: str, image_size: int = 0) -> dict:
  """Imports `path` (a `source` file) into the folder `output`; returns weights.json."""
  if source not in name_maps.SOURCES:
    raise errors.UsageError(f'--from={source!r} is not allowed: expected one of '
                            f'{name_maps.SOURCES}.')
  if not os.fspath(path).endswith(_suffixes(source)):
    raise errors.UsageError(f'--input={path}: a {source} file ends with '
                            f'{", ".join(_suffixes(source))}.')
  from vgg_flax.interop import transfer  # pylint: disable=g-import-not-at-top  # orbax.
  model, variables, info = hub.load_with_info(path, image_size=image_size or None)
  params = variables['params']
  preset = info['preset']  # hub.source_preset: the same as predict --weights and load.
  meta = {
      'source': source, 'input': os.fspath(storage.path(path)), 'model': hub.model_fields(model),
      'image_size': info['image_size'], 'in_channels': info['in_channels'],
      'output': info['output'], 'preset': preset, 'num_params': models.count_params(params),
      # The fields of earlier versions, for readers of weights.json.
      'depth': model.depth, 'batch_norm': model.batch_norm, 'include_top': 'fc1' in params,
      'num_classes': int(params['predictions']['bias'].shape[0]) if 'predictions' in params
                     else None,
      'fc1_inputs': int(params['fc1']['kernel'].shape[0]) if 'fc1' in params else None,
  }
  transfer.save_converted(variables, output, meta)
  return meta


def export(target: str, path: str, output: str, checkpoint: str = 'best') -> dict:
  """Exports a workdir or converted folder to a `target` file; returns what was written."""
  model, variables, info = hub.load_with_info(path, checkpoint=checkpoint)
  size, channels = info['image_size'], info['in_channels']
  if target == 'torchvision':
    weights_export.save_torchvision(weights_export.to_torchvision(model, variables, size), output)
  elif target == 'keras' and not output.endswith('.weights.h5') and output.endswith(
      ('.keras', '.h5')):  # A whole model (Keras needed); .weights.h5 needs only h5py.
    weights_export.save_keras_model(model, variables, output, (size, size, channels))
  elif target == 'keras':
    weights_export.save_keras_weights(model, variables, output)
  else:
    raise errors.UsageError(f'--to={target!r} is not allowed: expected one of '
                            f'{weights_export.TARGETS}.')
  return {'model': model, 'image_size': size, 'in_channels': channels}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)  # Keep orbax's chatter off the output.
  if (_FROM.value is None) == (_TO.value is None):
    raise errors.UsageError('give exactly one of --from (import into vgg_flax) and --to '
                            '(export from a workdir or converted folder).')
  if _TO.value:
    done = export(_TO.value, _INPUT.value, _OUTPUT.value, _CHECKPOINT.value)
    model = done['model']
    print(f'Exported {name_maps.describe(model)} ({model.num_classes} classes, '
          f'{done["image_size"]} px, {done["in_channels"]} input channels) to {_OUTPUT.value} '
          f'({_TO.value}).')
    return
  meta = convert(_FROM.value, _INPUT.value, _OUTPUT.value, _IMAGE_SIZE.value)
  model = models.VGG(**meta['model'])
  print(f'Converted {meta["source"]} {name_maps.describe(model)} ({meta["num_params"]:,} '
        f'parameters, head {model.head!r}, {meta["image_size"]} px, {meta["in_channels"]} input '
        f'channels) to {_OUTPUT.value}.\n'
        f'Train from it with --config.init_from={_OUTPUT.value}'
        + (f' --config.input.preset={meta["preset"]}' if meta['preset'] else ''))


if __name__ == '__main__':
  cli.run(main)
