"""Datasets that vgg_flax builds itself (registered with tfds on import)."""

from vgg_flax.datasets.digits import Digits

__all__ = ['Digits']
