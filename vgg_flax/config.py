"""The base configuration every config file under `configs/` starts from.

Every tunable of vgg_flax lives here with its default and a comment; config
files change only what differs (the paper's ImageNet recipe, the offline
digits run, ...). `validate` rejects a bad value at launch, naming the field and
what is allowed, before any data is read or any graph is compiled. A run's
config read back from its workdir: `vgg_flax.io.run_config`.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from vgg_flax.runtime import errors

MODEL_NAMES = ('vgg', 'resnet50')
DEPTHS = (11, 13, 16, 19)
VARIANTS = ('A', 'A-LRN', 'B', 'C', 'D', 'E', 'B-5x5')
HEADS = ('fc', 'gap', 'none')
POOLINGS = ('', 'avg', 'max')
CONV_IMPLS = ('auto', 'xla', 'patches', 'winograd')
DTYPES = ('float32', 'bfloat16', 'float16')
OPTIMIZERS = ('sgd', 'adam', 'adamw')
SCHEDULES = ('constant', 'step', 'cosine', 'plateau', 'plateau_train_loss')
INITS = ('default', 'paper')
TRAIN_CROPS = ('scale_jitter', 'random_resized', 'center')
NORMALIZATIONS = ('mean', 'mean_std', 'none')
MONITOR_MODES = ('max', 'min')
PRESETS = ('', 'torchvision', 'caffe')
NONFINITE = ('stop', 'skip')
REMATS = ('none', 'block', 'layer')
STATE_SHARDINGS = ('replicated', 'fsdp')
EVAL_MODES = ('center', 'dense', 'multicrop', 'dense+multicrop')
# What each evaluation during training reports, and which way is better.
MONITORS = {'eval_accuracy': 'max', 'eval_top5_accuracy': 'max', 'eval_loss': 'min'}

# ImageNet RGB statistics on the 0-255 scale (the paper subtracts the mean only).
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


def get_base_config() -> ml_collections.ConfigDict:
  """Returns the defaults: the paper's VGG-16 recipe on ImageNet (tfds).

  configs/imagenet.py adds what would not suit other data by default: AlexNet's
  colour shift (RGB only) and the dense evaluation at the end.
  """
  c = ml_collections.ConfigDict()

  # Model: see vgg_flax.models.VGG for the meaning of each field.
  c.model = ml_collections.ConfigDict()
  c.model.name = 'vgg'  # 'vgg' | 'resnet50' (reads width, conv_impl, dtype; not the VGG fields).
  c.model.depth = 16  # 11 | 13 | 16 | 19 (the paper's A, B, D, E).
  c.model.variant = ''  # '' | A | A-LRN | B | C | D | E | B-5x5 (paper 4.1); wins over depth.
  c.model.kernel_size = 3  # Any odd size; C's 1x1 convolutions stay 1x1.
  c.model.batch_norm = False
  c.model.dropout_rate = 0.5
  c.model.num_classes = config_dict.placeholder(int)  # None: from the dataset.
  c.model.head = 'fc'  # 'fc' (4096-4096-classes) | 'gap' | 'none' (features).
  c.model.pooling = ''  # head 'none': '' (feature map) | 'avg' | 'max'; 'gap': ''/'avg' | 'max'.
  c.model.fc_dim = 4096  # Width of the two hidden FC layers of the 'fc' head.
  c.model.gap_hidden_dim = 0  # 'gap' head: a hidden dense layer of this width; 0 = none.
  # The head's hidden widths, any number, e.g. (512,) or (256, 120); None: the
  # 'fc' head's (fc_dim, fc_dim), the 'gap' head's (gap_hidden_dim,) or none.
  c.model.hidden_dims = config_dict.placeholder(tuple)
  c.model.width = 64  # Channels of block 1; blocks 2-5 scale with it (64 = paper).
  c.model.conv_impl = 'auto'  # 'auto' | 'xla' (lax.conv) | 'patches' | 'winograd' (CPU).
  # Activations the backward pass keeps, the rest recomputed (memory for time):
  # 'none', 'block' (each block's output), 'layer' (each conv's output).
  c.model.remat = 'none'
  c.model.dtype = 'float32'  # Compute dtype; parameters stay float32.
  # 'default': LeCun normal kernels. 'paper': N(0, 0.01) weights, as the paper's net A
  # (deeper nets under it need net A's layers: configs/from_net_a.py). Biases are zero.
  c.model.init = 'default'

  # Data: any tfds name, 'digits' (built in, offline) or 'image_folder'.
  c.dataset = 'imagenet2012'
  c.data_dir = config_dict.placeholder(str)  # tfds data_dir, or the image folder root.
  c.eval_data_dir = config_dict.placeholder(str)  # image_folder: test class folders.
  c.validation_split = 0.0  # image_folder: fraction of each class of data_dir held out; 0 = off.
  c.train_split = 'train'
  c.eval_split = ''  # '' = 'validation' when the dataset has one, else 'test'.
  c.image_size = 224  # Side of the square crop the network sees.
  c.input = ml_collections.ConfigDict()
  c.input.train_crop = 'scale_jitter'  # 'scale_jitter' | 'random_resized' | 'center'.
  c.input.scale_min = 256  # Training scale S is drawn from [scale_min, scale_max];
  c.input.scale_max = 512  # equal values give the paper's fixed-S training.
  c.input.area_min = 0.08  # 'random_resized': smallest crop area fraction.
  c.input.flip = True  # Random horizontal flips in training.
  # Q: smaller side before the centre crop at evaluation; 0 = from the training
  # scale (the paper): S for fixed S, (scale_min + scale_max) // 2 for jittered S.
  c.input.eval_resize = 0
  # AlexNet's PCA colour shift: sigma of the per-image weights of the ImageNet RGB
  # principal components (0.1 in the paper); 0 = off. RGB images only.
  c.input.color_shift = 0.0
  c.input.normalization = 'mean'  # 'mean' (the paper) | 'mean_std' | 'none'.
  c.input.mean = IMAGENET_MEAN  # Per channel, 0-255 scale; length = image channels.
  c.input.std = IMAGENET_STD
  c.input.shuffle_buffer = 16_384
  c.input.cache = False  # Keep the encoded examples in memory (small datasets).
  # 'global': batch k is the same whatever the number of processes (each reads the
  # whole stream, decodes its share); 'per_process': disjoint reads, for big pods.
  c.input.order = 'global'
  c.input.preset = ''  # '' | 'torchvision' | 'caffe': the preprocessing that goes with
  # imported weights (torchvision: RGB mean/std on 0-1; caffe/Keras: BGR mean subtraction).
  c.input.skip_corrupt = False  # Image folders: skip unreadable files (counted) or fail.
  # True: batches travel to the devices as uint8 (a quarter of float32's bytes)
  # and are normalised inside the step; for hosts whose transfer is the limit.
  c.input.uint8_transfer = False

  # Optimisation.
  c.batch_size = 256  # Global, over all devices and hosts.
  c.eval_batch_size = 0  # 0 = batch_size.
  c.num_epochs = 74
  c.optimizer = 'sgd'  # 'sgd' (momentum) | 'adam' | 'adamw'.
  c.learning_rate = 0.01
  c.momentum = 0.9  # sgd only.
  c.nesterov = False
  c.weight_decay = 5e-4  # On kernels only (not biases or norm parameters).
  c.decoupled_weight_decay = False  # sgd/adam: False = L2 in the loss gradient.
  c.label_smoothing = 0.0
  c.schedule = ml_collections.ConfigDict()
  # 'constant' | 'step' | 'cosine' | 'plateau' (the paper: checkpoint.monitor at each
  # evaluation) | 'plateau_train_loss' (the epoch-averaged training loss, in the step).
  c.schedule.name = 'plateau'
  c.schedule.warmup_epochs = 0.0
  c.schedule.decay_epochs = (30, 60)  # 'step': epochs at which lr is multiplied by factor.
  c.schedule.factor = 0.1  # 'step' and the plateaus: the multiplier (paper: /10).
  c.schedule.patience = 3  # 'plateau': evaluations without checkpoint.monitor improving.
  c.schedule.patience_epochs = 3  # 'plateau_train_loss': epochs of no train-loss improvement.
  c.schedule.min_scale = 1e-3  # The plateaus: never below base lr x min_scale (3 drops).
  c.seed = 0

  # Transfer learning: start from a checkpoint dir or a converted weights file.
  c.init_from = ''  # '' = from scratch (a workdir's own checkpoint always wins).
  c.dont_load = ()  # Regexes over parameter paths not to load, e.g. ('predictions',).
  c.freeze = ()  # Regexes over parameter paths (or 'block1'...'block5') kept fixed.

  # Faults.
  c.on_nonfinite = 'stop'  # 'stop' | 'skip': a non-finite loss or gradient.
  # The batch as k micro-batches per optimiser step (memory; BatchNorm then
  # normalises each micro-batch); k divides each device's batch.
  c.grad_accum_steps = 1
  # The train state on the devices: 'replicated', or 'fsdp' (parameters and
  # optimiser state split over the devices, about N times less per device).
  c.state_sharding = 'replicated'
  c.profile_steps = ()  # (first, last): a jax.profiler trace of those steps in WORKDIR/profile.

  # Evaluation, checkpoints, logging.
  c.eval_every_epochs = 1
  c.log_every_steps = 50
  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.keep = 2  # Latest checkpoints kept; the best one is kept apart.
  c.checkpoint.monitor = 'eval_accuracy'  # Metric that picks the best checkpoint.
  c.checkpoint.mode = 'max'  # 'max' | 'min'.
  c.checkpoint.every_steps = 0  # Also save every N steps (long epochs); 0 = at evals only.
  c.early_stopping_patience = 0  # Evaluations without improvement; 0 = never stop.

  # One trainer per workdir: a lease (WORKDIR/lease.json) held while training.
  c.lease = ml_collections.ConfigDict()
  c.lease.refresh_s = 30.0  # How often the holder refreshes it.
  c.lease.stale_after_s = 300.0  # Unrefreshed this long (or its process gone): taken over.
  # Storage that stops answering (a bucket): how long the trainer waits on it,
  # retries included, before it stops naming the bucket; saved checkpoints are kept.
  c.storage = ml_collections.ConfigDict()
  c.storage.timeout_s = 600.0

  # The paper's test protocol (section 3.2), for `python -m vgg_flax.evaluate` and
  # `at_end`; the evaluation during training is always the centre crop at Q
  # (`eval_scale`), reported as eval_*.
  c.eval = ml_collections.ConfigDict()
  c.eval.mode = 'center'  # 'center' | 'dense' | 'multicrop' | 'dense+multicrop' (Table 6).
  # Test scales Q (smaller side); posteriors averaged. () = (Q,) of `eval_scale`;
  # ('paper',) = {S-32, S, S+32} for fixed S, {S_min, middle, S_max} for jittered S.
  c.eval.scales = ()
  c.eval.grid = 5  # 'multicrop': grid x grid crops per scale (the paper's 5x5).
  c.eval.flip = True  # 'dense', 'multicrop': also average over the mirrored image.
  # After the last step, evaluate the final state with this protocol on the eval
  # split, one process only; reported as final_eval_* (metrics.jsonl, result.json).
  c.eval.at_end = False
  return c


PAPER_SCALES = 'paper'
SCALE_STEP = 32  # The paper's fixed-S multi-scale test: {S - 32, S, S + 32}.


def crop_fraction_scale(image_size: int) -> int:
  """Q for nets trained on Inception-style random crops: the crop is 0.875 of the
  side (224 of 256), the convention of torchvision's and Keras' ImageNet models."""
  return image_size * 256 // 224


def eval_scale(config: ml_collections.ConfigDict) -> int:
  """Q of single-scale evaluation: `input.eval_resize`, or, when 0, from the training crop.

  As in the paper (section 4.1): Q = S for fixed S, the middle of
  [scale_min, scale_max] for jittered S (rounded down). `random_resized`
  crops draw no scale S: their Q is `crop_fraction_scale(image_size)`.
  """
  i = config.input
  if i.eval_resize:
    return i.eval_resize
  if i.train_crop == 'random_resized':
    return crop_fraction_scale(config.image_size)
  return (i.scale_min + i.scale_max) // 2


def eval_scales(config: ml_collections.ConfigDict) -> tuple[int, ...]:
  """The test scales Q of `config.eval.scales`, resolved.

  () is `(eval_scale(config),)`; ('paper',) is the paper's multi-scale set
  (section 4.2): {S - 32, S, S + 32} for fixed S, {S_min, (S_min + S_max) // 2,
  S_max} for jittered S; anything else is taken as given.
  """
  scales = config.eval.scales
  if scales in (PAPER_SCALES, (PAPER_SCALES,)):
    lo, hi = config.input.scale_min, config.input.scale_max
    if lo == hi:
      return (lo - SCALE_STEP, lo, lo + SCALE_STEP)
    return (lo, (lo + hi) // 2, hi)
  return tuple(scales) or (eval_scale(config),)


def _check(ok: bool, field: str, value, allowed: str) -> None:
  if not ok:
    raise errors.UsageError(f'config.{field}={value!r} is not allowed: {allowed}.')


def _choice(config, field: str, choices) -> None:
  value = config
  for part in field.split('.'):
    value = value[part]
  _check(value in choices, field, value, 'expected one of ' + ', '.join(map(repr, choices)))


def _positive(config, field: str) -> None:
  value = config
  for part in field.split('.'):
    value = value[part]
  _check(value is not None and value > 0, field, value, 'must be > 0')


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first bad field and the allowed values."""
  m = config.model
  _choice(config, 'model.name', MODEL_NAMES)
  _choice(config, 'model.depth', DEPTHS)
  _choice(config, 'model.variant', ('',) + VARIANTS)
  _check(m.kernel_size > 0 and m.kernel_size % 2 == 1, 'model.kernel_size', m.kernel_size,
         'must be a positive odd integer (1, 3, 5, 7, ...)')
  _choice(config, 'model.head', HEADS)
  _choice(config, 'model.pooling', POOLINGS)
  _check(not m.pooling or m.head != 'fc', 'model.pooling', m.pooling,
         "only with model.head 'gap' or 'none'; the 'fc' head flattens the map")
  _check(0.0 <= m.dropout_rate < 1.0, 'model.dropout_rate', m.dropout_rate, 'must be in [0, 1)')
  _check(m.num_classes is None or m.num_classes > 0, 'model.num_classes', m.num_classes,
         'must be > 0, or None to take it from the dataset')
  _positive(config, 'model.fc_dim')
  _positive(config, 'model.width')
  _check(m.gap_hidden_dim >= 0, 'model.gap_hidden_dim', m.gap_hidden_dim, 'must be >= 0')
  hidden = m.get('hidden_dims')
  _check(hidden is None or (m.head != 'none' and all(
      isinstance(d, int) and d > 0 for d in hidden)), 'model.hidden_dims', hidden,
         "must be None or positive widths, e.g. (512,), with model.head 'fc' or 'gap'")
  _check(hidden is None or not m.gap_hidden_dim, 'model.hidden_dims', hidden,
         'set it or model.gap_hidden_dim, not both')
  _choice(config, 'model.conv_impl', CONV_IMPLS)
  _choice(config, 'model.dtype', DTYPES)
  _choice(config, 'model.init', INITS)

  fraction, eval_dir = config.validation_split, config.eval_data_dir
  _check(0.0 <= fraction < 1.0, 'validation_split', fraction,
         'must be in (0, 1): the fraction of each class held out for evaluation (0 = off)')
  _check(not fraction or not eval_dir, 'validation_split', fraction,
         f'set it or config.eval_data_dir ({eval_dir!r}), not both')
  for field, value in (('validation_split', fraction), ('eval_data_dir', eval_dir)):
    _check(not value or config.dataset == 'image_folder', field, value, "only with config."
           f"dataset='image_folder' (tfds: train_split='train[:80%]', eval_split='train[80%:]')")
  # Five 2x2 poolings need 32 px; the 'fc' head's flatten needs whole pixels.
  _check(config.image_size >= 32, 'image_size', config.image_size,
         'must be >= 32: VGG halves the image five times')
  _choice(config, 'input.train_crop', TRAIN_CROPS)
  i = config.input
  _check(i.scale_min >= config.image_size, 'input.scale_min', i.scale_min,
         f'must be >= image_size ({config.image_size}): the crop is taken from the rescaled image')
  _check(i.scale_max >= i.scale_min, 'input.scale_max', i.scale_max,
         f'must be >= input.scale_min ({i.scale_min})')
  _check(i.eval_resize == 0 or i.eval_resize >= config.image_size, 'input.eval_resize',
         i.eval_resize, f'must be >= image_size ({config.image_size}), or 0 (from the training '
         'scale: S, or the middle of [scale_min, scale_max])')
  _check(i.color_shift >= 0, 'input.color_shift', i.color_shift,
         "must be >= 0 (0 = off; 0.1 = AlexNet's and the paper's)")
  _check(not i.color_shift or i.preset or len(i.mean) == 3, 'input.color_shift', i.color_shift,
         f'needs RGB images, and input.mean has {len(i.mean)} channel(s); set it to 0')
  _check(0.0 < i.area_min <= 1.0, 'input.area_min', i.area_min, 'must be in (0, 1]')
  _choice(config, 'input.normalization', NORMALIZATIONS)
  _check(len(i.mean) == len(i.std), 'input.std', i.std,
         f'must have as many entries as input.mean ({len(i.mean)})')
  _check(all(s > 0 for s in i.std), 'input.std', i.std, 'every entry must be > 0')

  for field in ('batch_size', 'num_epochs', 'learning_rate', 'eval_every_epochs',
                'log_every_steps', 'checkpoint.keep', 'input.shuffle_buffer'):
    _positive(config, field)
  _check(config.eval_batch_size >= 0, 'eval_batch_size', config.eval_batch_size,
         'must be >= 0 (0 = batch_size)')
  _choice(config, 'optimizer', OPTIMIZERS)
  _check(0.0 <= config.momentum < 1.0, 'momentum', config.momentum, 'must be in [0, 1)')
  _check(config.weight_decay >= 0, 'weight_decay', config.weight_decay, 'must be >= 0')
  _check(0.0 <= config.label_smoothing < 1.0, 'label_smoothing', config.label_smoothing,
         'must be in [0, 1)')
  _choice(config, 'schedule.name', SCHEDULES)
  s = config.schedule
  _check(s.warmup_epochs >= 0, 'schedule.warmup_epochs', s.warmup_epochs, 'must be >= 0')
  _check(0.0 < s.factor <= 1.0, 'schedule.factor', s.factor, 'must be in (0, 1]')
  _check(isinstance(s.patience, int) and s.patience >= 1, 'schedule.patience', s.patience,
         'must be an integer >= 1 (evaluations without improvement)')
  _check(s.patience_epochs >= 1, 'schedule.patience_epochs', s.patience_epochs, 'must be >= 1')
  _check(0.0 < s.min_scale <= 1.0, 'schedule.min_scale', s.min_scale, 'must be in (0, 1]')
  _choice(config, 'checkpoint.monitor', tuple(MONITORS))
  _choice(config, 'checkpoint.mode', MONITOR_MODES)
  monitor = config.checkpoint.monitor
  _check(config.checkpoint.mode == MONITORS[monitor], 'checkpoint.mode', config.checkpoint.mode,
         f"{monitor} is better when {'higher' if MONITORS[monitor] == 'max' else 'lower'}: "
         f'use {MONITORS[monitor]!r}')
  _check(isinstance(config.seed, int) and 0 <= config.seed < 2**31, 'seed', config.seed,
         'must be an integer in [0, 2**31)')
  _choice(config, 'input.preset', PRESETS)
  _choice(config, 'input.order', ('global', 'per_process'))
  _choice(config, 'on_nonfinite', NONFINITE)
  _choice(config, 'model.remat', REMATS)
  _choice(config, 'state_sharding', STATE_SHARDINGS)
  _check(config.grad_accum_steps >= 1, 'grad_accum_steps', config.grad_accum_steps,
         'must be >= 1')
  steps = tuple(config.profile_steps)
  _check(steps == () or (len(steps) == 2 and 1 <= steps[0] <= steps[1]), 'profile_steps',
         steps, 'must be () or (first, last) steps with 1 <= first <= last')
  _check(config.checkpoint.every_steps >= 0, 'checkpoint.every_steps',
         config.checkpoint.every_steps, 'must be >= 0 (0 = at evaluations only)')
  _positive(config, 'lease.refresh_s')
  _positive(config, 'storage.timeout_s')
  _check(config.lease.stale_after_s > config.lease.refresh_s, 'lease.stale_after_s',
         config.lease.stale_after_s,
         f'must be > lease.refresh_s ({config.lease.refresh_s}), or a live trainer looks stale')
  _check(config.early_stopping_patience >= 0, 'early_stopping_patience',
         config.early_stopping_patience, 'must be >= 0 (0 = off)')

  e = config.eval
  _choice(config, 'eval.mode', EVAL_MODES)
  # Every crop, and the dense score map, needs the smaller side to cover image_size.
  paper = e.scales in (PAPER_SCALES, (PAPER_SCALES,))
  _check(paper or all(isinstance(q, int) and q >= config.image_size for q in e.scales),
         'eval.scales', e.scales, f'every scale Q must be an integer >= image_size '
         f"({config.image_size}); () = from the training scale; ('paper',) = the paper's three")
  # {S - 32, S, S + 32}: S - 32 must still cover the crop.
  _check(not paper or min(eval_scales(config)) >= config.image_size, 'eval.scales', e.scales,
         f'gives Q={min(eval_scales(config))} for fixed S={i.scale_min}, below image_size '
         f'({config.image_size}); list the scales instead')
  _check(e.grid >= 1, 'eval.grid', e.grid, "must be >= 1 (5 = the paper's 5x5 crops)")
