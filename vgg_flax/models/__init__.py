"""The model family: VGG (`vgg`, on `layers` and `winograd`), the ResNet-50 baseline (`resnet`),
analytic FLOPs (`flops`) and intermediate features by layer name (`feature_extraction`).

`from vgg_flax import models` gives the VGG API: `models.vgg16(...)`, `models.VGG(...)`.
"""

from vgg_flax.models.vgg import (ARCHITECTURE_FIELDS, BLOCK_CHANNELS, CFGS, DEPTH_TO_VARIANT,
                                 BLOCK_OUTPUT, DTYPES, LAYER_OUTPUT, LRN_VARIANTS, MIN_IMAGE_SIZE,
                                 VGG, count_params,
                                 create_model, vgg11, vgg13, vgg16, vgg19)
