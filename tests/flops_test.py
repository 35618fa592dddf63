"""Tests for vgg_flax.models.flops: the analytic counts and the peak table."""

import jax
import pytest

from vgg_flax import models
from vgg_flax.models import flops


@pytest.mark.parametrize('depth,gmacs', [(11, 7.61), (13, 11.31), (16, 15.47), (19, 19.63)])
def test_forward_flops_match_the_published_macs_at_224(depth, gmacs):
  # The usual figures (e.g. torchvision's docs / ptflops: VGG-16 15.47 GMACs).
  got = flops.forward_flops(models.VGG(depth=depth), 224) / 2 / 1e9
  assert got == pytest.approx(gmacs, abs=0.01)


def test_vgg16_train_flops_and_small_images():
  vgg16 = models.VGG(depth=16)
  assert flops.forward_flops(vgg16, 224) == pytest.approx(30.95e9, rel=1e-3)
  assert flops.train_flops(vgg16, 224) == 3 * flops.forward_flops(vgg16, 224)
  # At 32 px every conv does 1/49 of its 224 px work; fc1 reads 512 inputs, not 25088.
  convs_224 = flops.forward_flops(models.VGG(depth=16, head='none'), 224)
  convs_32 = flops.forward_flops(models.VGG(depth=16, head='none'), 32)
  assert convs_32 * 49 == convs_224
  head_32 = 2 * (512 * 4096 + 4096 * 4096 + 4096 * 10)
  assert flops.forward_flops(models.VGG(depth=16, num_classes=10), 32) == convs_32 + head_32
  # Any hidden layers: Flatten over the 2x2 map at 64 px, or a global pool.
  convs_64 = convs_32 * 4
  assert flops.forward_flops(models.VGG(depth=16, num_classes=10, hidden_dims=(100,)), 64) == (
      convs_64 + 2 * (2048 * 100 + 100 * 10))
  assert flops.forward_flops(models.VGG(depth=16, num_classes=10, head='gap', pooling='max',
                                        hidden_dims=(100, 50)), 64) == (
      convs_64 + 2 * (512 * 100 + 100 * 50 + 50 * 10))


def test_one_channel_and_width():
  full = flops.forward_flops(models.VGG(depth=11, head='none'), 32, in_channels=3)
  gray = flops.forward_flops(models.VGG(depth=11, head='none'), 32, in_channels=1)
  assert full - gray == 2 * 32 * 32 * 9 * 2 * 64
  names = [layer[0] for layer in flops.conv_layers(models.VGG(depth=11, width=8), 32)]
  assert names[:3] == ['block1_conv1', 'block2_conv1', 'block3_conv1']


@pytest.mark.parametrize('kind,peak', [('NVIDIA H100 80GB HBM3', 989e12),
                                       ('NVIDIA A100-SXM4-40GB', 312e12),
                                       ('TPU v4', 275e12), ('TPU v5 lite', 197e12),
                                       ('TPU v5p', 459e12), ('TPU v6 lite', 918e12)])
def test_peak_table(kind, peak):
  class FakeDevice:
    device_kind = kind
  got, source = flops.device_peak_flops(FakeDevice())
  assert got == peak and source.startswith('table: ')


def test_cpu_peak_is_measured():
  peak, source = flops.device_peak_flops(jax.devices('cpu')[0])
  assert source == 'measured float32 matmul' and peak > 1e8
  assert flops.mfu(10.0, 2e9, 40e9) == pytest.approx(0.5)
