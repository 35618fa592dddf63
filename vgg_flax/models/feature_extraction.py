"""Named VGG features, for perceptual and style losses, LPIPS-style metrics, probing.

  feats = vgg_flax.features(model, variables, images,
                            layers=('block1_conv2', 'block2_conv2', 'block3_conv3'))
  feats['block3_conv3']  # (N, H/4, W/4, C3), after its ReLU

Like torchvision's `create_feature_extractor` or Keras'
`Model(inputs, [layer.output ...])`: the activations of the named layers, as
a dict. Only the layers up to the last one asked for run (`models.VGG`'s
`capture`), and the function is pure, so it can be traced by `jax.jit` or
differentiated inside a loss.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax

from vgg_flax import models

# The layers of the perceptual loss of Johnson et al. (2016) and LPIPS' VGG.
DEFAULT_LAYERS = ('block1_conv2', 'block2_conv2', 'block3_conv3', 'block4_conv3')


def features(model: models.VGG, variables: dict[str, Any], images: jax.Array,
             layers: Sequence[str] = DEFAULT_LAYERS) -> dict[str, jax.Array]:
  """The post-ReLU activations of `layers` (see `models.VGG.layer_names()`).

  Args:
    model: a `models.VGG` (from `vgg_flax.load` or built directly).
    variables: its variables.
    images: NHWC float32, preprocessed as the weights expect.
    layers: layer names: convs (after BN and ReLU), `blockN_pool`, and the
      head's dense layers.

  Returns:
    {name: float32 activations} for each of `layers`.

  Raises:
    errors.UsageError: an unknown name, listing the valid ones.
  """
  if isinstance(layers, str):
    layers = (layers,)
  return model.apply(variables, images, capture=tuple(layers))
