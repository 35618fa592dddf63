"""The VGG model zoo (Simonyan & Zisserman, 2015), as one table and one module.

`CFGS` is the paper's Table 1: one entry per column, five blocks, one kernel
size per conv layer. `VGG` walks it. Layer names follow Keras Applications
(`block3_conv2`, `fc1`, `predictions`) plus `block3_bn2` for BatchNorm, and do
not change with the options, because checkpoints and weight import rely on
them.

Unlike torchvision (NCHW, `AdaptiveAvgPool2d(7)` before the classifier), the
'fc' head flattens the NHWC feature map of whatever size it is: at 224 px that
is 7*7*512 = 25088 inputs to `fc1`, at 32 px 512. Importing torchvision's
`fc1` therefore needs its rows permuted from (C, H, W) to (H, W, C) order.

`create_model` also builds the ResNet-50 baseline of `vgg_flax.models.resnet`
(`config.model.name='resnet50'`).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
import ml_collections
import numpy as np

from vgg_flax import config as config_choices
from vgg_flax.models import layers
from vgg_flax.models import resnet
from vgg_flax.runtime import errors

Array = jax.Array

# Table 1 of the paper. K (None) is the configured `kernel_size` (3 in the paper);
# a number is a fixed size (C's 1x1 convs, B-5x5's 5x5) whatever `kernel_size` is.
K = None
CFGS: dict[str, tuple[tuple[int | None, ...], ...]] = {
    'A': ((K,), (K,), (K, K), (K, K), (K, K)),
    'A-LRN': ((K,), (K,), (K, K), (K, K), (K, K)),
    'B': ((K, K), (K, K), (K, K), (K, K), (K, K)),
    'C': ((K, K), (K, K), (K, K, 1), (K, K, 1), (K, K, 1)),
    'D': ((K, K), (K, K), (K, K, K), (K, K, K), (K, K, K)),
    'E': ((K, K), (K, K), (K, K, K, K), (K, K, K, K), (K, K, K, K)),
    # Section 4.1's shallow control: B with each pair of stacked 3x3 convs
    # replaced by one 5x5 (the same receptive field, fewer non-linearities).
    'B-5x5': ((5,), (5,), (5,), (5,), (5,)),
}
del K
# Columns with local response normalisation after block1_conv1's ReLU.
LRN_VARIANTS = frozenset({'A-LRN'})
BLOCK_CHANNELS = (64, 128, 256, 512, 512)
DEPTH_TO_VARIANT = {11: 'A', 13: 'B', 16: 'D', 19: 'E'}
MIN_IMAGE_SIZE = 32  # Five 2x2 poolings.
# Names of the activations a rematerialised step keeps (training/step.py,
# config.model.remat): each block's pooled output, each conv layer's output.
BLOCK_OUTPUT, LAYER_OUTPUT = 'block_output', 'layer_output'
# The choices config validation offers are the model's, named once in config.py.
DTYPES = {name: jnp.dtype(name) for name in config_choices.DTYPES}
# VGG.weight_init (config.model.init): the kernels' initialiser; biases start at
# zero either way. 'paper' is N(0, 0.01) (section 3.1; std 0.01 as in Caffe). The
# signal then shrinks 2-5x per layer, and a VGG-16's logits start at ~3e-6 (224 px,
# measured): the paper trained only net A from it, the deeper nets from net A.
INITS = {'default': nn.initializers.lecun_normal(), 'paper': nn.initializers.normal(0.01)}
# The config.model fields that shape each model's parameters (the others are
# ignored by it); None: every field but the numerics (dtype, conv_impl, ...).
ARCHITECTURE_FIELDS = {'vgg': None, 'resnet50': ('name', 'num_classes', 'width')}


def _allowed(field: str, value: Any, allowed: str) -> ValueError:
  return errors.UsageError(f'VGG.{field}={value!r} is not allowed: {allowed}')


def _one_of(choices) -> str:
  return 'expected one of ' + ', '.join(map(repr, choices))


class VGG(nn.Module):
  """A VGG network: five conv blocks, each ending in a 2x2 max pool, and a head.

  Attributes:
    depth: 11, 13, 16 or 19 weight layers (the paper's A, B, D, E).
    variant: a column of Table 1 ('A', 'A-LRN', 'B', 'C', 'D', 'E') or
      'B-5x5' (one 5x5 conv per block); wins over `depth` when set.
    num_classes: outputs of the 'fc' and 'gap' heads.
    kernel_size: side of the conv kernels (odd); config C's 1x1 convs stay 1x1.
    batch_norm: BatchNorm between each conv and its ReLU (torchvision's _bn).
    dropout_rate: dropout after each hidden dense layer (and, head 'gap', after the pool).
    head: 'fc' (flatten, fc1, fc2, predictions), 'gap' (global pool, optional
      hidden layers, predictions) or 'none' (features).
    pooling: head 'none': '' returns the feature map after the 5th pool,
      'avg' / 'max' pool it globally to (N, C). Head 'gap': '' or 'avg'
      (global average pooling) or 'max' (Keras' GlobalMaxPooling2D).
    fc_dim: width of fc1 and fc2 (4096 in the paper).
    gap_hidden_dim: head 'gap': width of a hidden dense layer; 0 for none.
    hidden_dims: the head's hidden dense widths, any number of them, instead of
      fc_dim / gap_hidden_dim (None): e.g. (512,) for Flatten-Dense(512)-Dense(10).
      Named fc1, fc2, fc3, ... ('fc') and gap_hidden, gap_hidden2, ... ('gap').
    width: channels of block 1; the other blocks scale with it (64 = paper).
    conv_impl: `layers.Conv` lowering: 'auto', 'xla', 'patches' or 'winograd'.
    dtype: compute dtype of every layer; outputs are cast to float32.
    param_dtype: dtype of the parameters.
    weight_init: kernel initialiser of the conv and dense layers, a key of `INITS`:
      'default' (LeCun normal) or 'paper' (N(0, 0.01)).
  """
  depth: int = 16
  variant: str = ''
  num_classes: int = 1000
  kernel_size: int = 3
  batch_norm: bool = False
  dropout_rate: float = 0.5
  head: str = 'fc'
  pooling: str = ''
  fc_dim: int = 4096
  gap_hidden_dim: int = 0
  hidden_dims: tuple[int, ...] | None = None
  width: int = 64
  conv_impl: str = 'auto'
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  weight_init: str = 'default'

  def __post_init__(self):
    # Fail when the model is built, before any tracing, naming the field.
    if not self.variant and self.depth not in DEPTH_TO_VARIANT:
      raise _allowed('depth', self.depth, _one_of(DEPTH_TO_VARIANT))
    if self.variant and self.variant not in CFGS:
      raise _allowed('variant', self.variant, _one_of(('',) + tuple(CFGS)))
    if self.kernel_size < 1 or self.kernel_size % 2 == 0:
      raise _allowed('kernel_size', self.kernel_size,
                     'must be a positive odd integer (1, 3, 5, 7, ...)')
    if self.head not in config_choices.HEADS:
      raise _allowed('head', self.head, _one_of(config_choices.HEADS))
    if self.pooling not in config_choices.POOLINGS:
      raise _allowed('pooling', self.pooling, _one_of(config_choices.POOLINGS))
    if self.pooling and self.head == 'fc':
      raise _allowed('pooling', self.pooling,
                     "only with head 'gap' or 'none'; the 'fc' head flattens the map")
    if self.conv_impl not in layers.CONV_IMPLS:
      raise _allowed('conv_impl', self.conv_impl, _one_of(layers.CONV_IMPLS))
    if self.weight_init not in INITS:
      raise _allowed('weight_init', self.weight_init, _one_of(INITS))
    if not 0.0 <= self.dropout_rate < 1.0:
      raise _allowed('dropout_rate', self.dropout_rate, 'must be in [0, 1)')
    for field in ('num_classes', 'fc_dim', 'width'):
      if getattr(self, field) < 1:
        raise _allowed(field, getattr(self, field), 'must be >= 1')
    if self.gap_hidden_dim < 0:
      raise _allowed('gap_hidden_dim', self.gap_hidden_dim, 'must be >= 0 (0 = none)')
    if self.hidden_dims is not None:
      # JSON and configs give lists; a module's fields must be hashable for jit.
      object.__setattr__(self, 'hidden_dims', tuple(int(d) for d in self.hidden_dims))
      if any(d < 1 for d in self.hidden_dims):  # Head 'none' ignores them, as it does fc_dim.
        raise _allowed('hidden_dims', self.hidden_dims,
                       'must be widths >= 1 (None: fc_dim / gap_hidden_dim)')
      if self.gap_hidden_dim and self.head == 'gap':
        raise _allowed('hidden_dims', self.hidden_dims, 'set it or gap_hidden_dim, not both')
    super().__post_init__()

  @property
  def cfg_name(self) -> str:
    """The column of Table 1 this model builds."""
    return self.variant or DEPTH_TO_VARIANT[self.depth]

  def layer_names(self) -> tuple[str, ...]:
    """The layers `capture` can name, in order: convs (after their BN and ReLU),
    pools, and the head's dense layers (after their ReLU; `predictions`: logits)."""
    names = []
    for b, kernels in enumerate(CFGS[self.cfg_name], 1):
      names += [f'block{b}_conv{i}' for i in range(1, len(kernels) + 1)] + [f'block{b}_pool']
    if self.head != 'none':
      names += [name for name, _ in self.hidden_layers()] + ['predictions']
    return tuple(names)

  def hidden_layers(self) -> tuple[tuple[str, int], ...]:
    """(name, width) of the head's hidden dense layers, in order."""
    if self.head == 'none':
      return ()
    dims = self.hidden_dims
    if dims is None:
      dims = ((self.fc_dim, self.fc_dim) if self.head == 'fc' else
              (self.gap_hidden_dim,) * bool(self.gap_hidden_dim))
    if self.head == 'fc':
      return tuple((f'fc{i}', d) for i, d in enumerate(dims, 1))
    # 'gap_hidden' alone keeps the name of runs made before hidden_dims existed.
    return tuple(('gap_hidden' + (str(i) if i > 1 else ''), d) for i, d in enumerate(dims, 1))

  @nn.compact
  def __call__(self, x: Array, train: bool = False, capture: tuple[str, ...] = ()
               ) -> Array | dict[str, Array]:
    """Runs the network.

    Args:
      x: images, NHWC, at least 32x32.
      train: use batch statistics and update them, and apply dropout (needs a
        'dropout' rng).
      capture: names from `layer_names()`: return their float32 activations
        as a dict instead, without computing the layers after the last one.

    Returns:
      float32 logits (N, num_classes) for the 'fc' and 'gap' heads; for head
      'none' the float32 features, (N, H/32, W/32, C) or (N, C) when pooled.
    """
    captured, wanted = {}, frozenset(capture)
    if wanted - set(self.layer_names()):
      raise errors.UsageError(
          f'unknown layer {sorted(wanted - set(self.layer_names()))[0]!r} to capture; this '
          f'model has: {", ".join(self.layer_names())}')

    def done(name: str, value: Array) -> bool:  # True once every wanted layer is captured.
      if name in wanted:
        captured[name] = value.astype(jnp.float32)
      return bool(wanted) and len(captured) == len(wanted)

    if x.ndim != 4:
      raise ValueError(f'VGG expects NHWC images, got an input of shape {x.shape}')
    if min(x.shape[1:3]) < MIN_IMAGE_SIZE:
      raise ValueError(f'VGG halves the image five times; input is '
                       f'{x.shape[1]}x{x.shape[2]}, need at least 32x32')
    conv = functools.partial(layers.Conv, impl=self.conv_impl, dtype=self.dtype,
                             param_dtype=self.param_dtype, kernel_init=INITS[self.weight_init])
    bn = layers.batch_norm(train, self.dtype, self.param_dtype)
    dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype,
                              kernel_init=INITS[self.weight_init])
    dropout = functools.partial(nn.Dropout, rate=self.dropout_rate, deterministic=not train)

    for b, (kernels, channels) in enumerate(zip(CFGS[self.cfg_name], BLOCK_CHANNELS), 1):
      features = max(1, channels * self.width // 64)
      for i, k in enumerate(kernels, 1):
        x = conv(features, k or self.kernel_size, name=f'block{b}_conv{i}')(x)
        if self.batch_norm:
          x = bn(name=f'block{b}_bn{i}')(x)
        x = checkpoint_name(nn.relu(x), LAYER_OUTPUT)
        if done(f'block{b}_conv{i}', x):
          return captured
        if b == 1 and i == 1 and self.cfg_name in LRN_VARIANTS:
          x = layers.LocalResponseNorm(name='block1_lrn')(x)
      x = checkpoint_name(layers.MaxPool2x2(name=f'block{b}_pool')(x), BLOCK_OUTPUT)
      if done(f'block{b}_pool', x):
        return captured

    if self.head != 'none':
      if self.head == 'fc':
        x = x.reshape(x.shape[0], -1)
      else:
        pool = self.pooling or 'avg'
        x = dropout()(layers.GlobalPool(pool, name=f'{pool}_pool')(x))
      for name, features in self.hidden_layers():
        x = nn.relu(dense(features, name=name)(x))
        if done(name, x):
          return captured
        x = dropout()(x)
      x = dense(self.num_classes, name='predictions')(x)
    elif self.pooling:
      x = layers.GlobalPool(self.pooling, name=f'{self.pooling}_pool')(x)
    if done('predictions', x):
      return captured
    # The loss and the metrics stay float32 whatever the compute dtype.
    return x.astype(jnp.float32)


vgg11 = functools.partial(VGG, depth=11)
vgg13 = functools.partial(VGG, depth=13)
vgg16 = functools.partial(VGG, depth=16)
vgg19 = functools.partial(VGG, depth=19)


def create_model(model_config: ml_collections.ConfigDict, num_classes: int
                 ) -> VGG | resnet.ResNet:
  """Builds the model `config.model.name` names from the `config.model` group.

  'vgg' reads every field. 'resnet50' (`resnet.ResNet`) reads `width`,
  `conv_impl` and `dtype` and ignores the VGG-only ones (depth, variant,
  kernel_size, batch_norm, dropout_rate, head, pooling, fc_dim, gap_hidden_dim, hidden_dims):
  it always has BatchNorm, no dropout and a global-average-pool classifier.

  Args:
    model_config: `config.model` (see `vgg_flax.config.get_base_config`).
    num_classes: outputs of the classifier; the caller resolves
      `config.model.num_classes` or the dataset's number of classes.

  Returns:
    The (unbound) model.

  Raises:
    ValueError: for an unknown `name` or `dtype`, or any field the model rejects.
  """
  m = model_config
  if m.name not in config_choices.MODEL_NAMES:
    raise ValueError(f'config.model.name={m.name!r} is not allowed: '
                     f'{_one_of(config_choices.MODEL_NAMES)}')
  if m.dtype not in DTYPES:
    raise ValueError(f'config.model.dtype={m.dtype!r} is not allowed: {_one_of(DTYPES)}')
  if m.name == 'resnet50':
    return resnet.resnet50(num_classes=num_classes, width=m.width, conv_impl=m.conv_impl,
                           dtype=DTYPES[m.dtype])
  return VGG(depth=m.depth, variant=m.variant, num_classes=num_classes,
             kernel_size=m.kernel_size, batch_norm=m.batch_norm,
             dropout_rate=m.dropout_rate, head=m.head, pooling=m.pooling,
             fc_dim=m.fc_dim, gap_hidden_dim=m.gap_hidden_dim,
             hidden_dims=m.get('hidden_dims'), width=m.width,
             conv_impl=m.conv_impl, dtype=DTYPES[m.dtype],
             weight_init=m.get('init', 'default'))


def count_params(params: Any) -> int:
  """Number of scalars in a pytree of arrays or `jax.ShapeDtypeStruct`s.

  Args:
    params: e.g. `variables['params']`, or the output of `jax.eval_shape`.

  Returns:
    The total number of elements, as a Python int.
  """
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(params))
