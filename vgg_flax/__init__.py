"""vgg_flax: VGG networks in JAX/Flax, from a laptop CPU to a TPU pod."""

from vgg_flax.runtime import quiet as _quiet

# Before TensorFlow or JAX is imported: their log levels and platforms.
_quiet.configure_environment()


# The Python API, imported on first use, so that `import vgg_flax` (every
# command line's start-up) stays as cheap as it was.
_LAZY = {'load': ('vgg_flax.interop.hub', 'load'),
         'features': ('vgg_flax.models.feature_extraction', 'features'),
         **{name: ('vgg_flax.notebook', name)
            for name in ('config_from', 'fit', 'History', 'predict_image')}}


def __getattr__(name):
  if name in _LAZY:
    import importlib  # pylint: disable=g-import-not-at-top
    module, attr = _LAZY[name]
    return getattr(importlib.import_module(module), attr)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
