"""Evaluates a trained workdir: loss, top-1 and top-5 accuracy on a split.

  python -m vgg_flax.evaluate --workdir=runs/vgg16_digits [--split=test] \
      [--checkpoint=best|latest] [--config.eval_batch_size=128 ...] \
      [--config.eval.mode=dense+multicrop --config.eval.scales='(256,384,512)' | =paper]

The run's own config (WORKDIR/config.json) is used, with the same evaluation
preprocessing as training (and the normalisation constants recorded in
WORKDIR/dataset.json); `--config.FIELD=VALUE` overrides any field of it.

`config.eval` selects the paper's test protocol (section 3.2): 'center' (one
centre crop, what training reports), 'dense' (the whole image, the FC layers
applied as convolutions, the class score map averaged), 'multicrop' (a grid of
crops) or 'dense+multicrop' (Table 6), at one or several test scales Q, with
mirrored views; the softmax posteriors are averaged over all of them. The
test scales default to the training scale (`config.eval_scales`): Q = S for
fixed S, the middle of [S_min, S_max] for jittered S; `eval.scales=paper`
gives the paper's three.
"""

from __future__ import annotations

import functools
import sys
import time
from typing import Any, Callable

from absl import app
from absl import flags
from absl import logging
import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
import optax

from vgg_flax import config as config_lib
from vgg_flax.data import input_pipeline
from vgg_flax.interop import transfer
from vgg_flax.io import run_config
from vgg_flax.io import workdirs
from vgg_flax.runtime import cli
from vgg_flax.training import reporting
from vgg_flax.training import step as step_lib


# The views each eval.mode averages (paper Table 6: dense and multi-crop combined).
MODE_VIEWS = {'center': ('center',), 'dense': ('dense',), 'multicrop': ('multicrop',),
              'dense+multicrop': ('dense', 'multicrop')}
MIN_PROBABILITY = 1e-12  # Clips -log p[label] when a posterior underflows.


def fc_as_conv(params: dict[str, Any], features: jax.Array, train_size: int) -> jax.Array:
  """The 'fc' head slid over a feature map: the class score map of dense evaluation.

  fc1 was trained on the (h0, w0, C) map of a training crop, flattened in
  (H, W, C) order (`models.VGG` flattens NHWC), so its kernel reshaped to
  (h0, w0, C, F) is the VALID convolution that applies fc1 at every window of
  a larger map; fc2 (and any further fcN) and predictions become 1x1
  convolutions. No dropout, as at evaluation; computed in float32.

  Args:
    params: the 'fc' model's params (uses fc1, fc2, ..., predictions).
    features: (N, H, W, C) map after the fifth pooling, H, W >= h0.
    train_size: `config.image_size`, the crop fc1 was trained on:
      h0 = w0 = train_size // 32.

  Returns:
    float32 class scores (N, H - h0 + 1, W - w0 + 1, num_classes).
  """
  side, channels = train_size // input_pipeline.TOTAL_STRIDE, features.shape[-1]
  # fc1, fc2, ... in order, then predictions (alone for a head with no hidden layer).
  names = [f'fc{i}' for i in range(1, len(params)) if f'fc{i}' in params] + ['predictions']
  kernel = params[names[0]]['kernel']
  if kernel.shape[0] != side * side * channels:
    raise ValueError(f'{names[0]} has {kernel.shape[0]} inputs, not the {side}x{side}x'
                     f'{channels} map of a {train_size} px crop: is config.image_size the size '
                     'the model was trained at?')
  x = lax.conv_general_dilated(features, kernel.reshape(side, side, channels, -1), (1, 1),
                               'VALID', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  for i, name in enumerate(names):
    x = x + params[name]['bias'] if i == 0 else x @ params[name]['kernel'] + params[name]['bias']
    if name != 'predictions':
      x = jax.nn.relu(x)
  return x


@functools.partial(jax.jit, static_argnames=('model', 'dense_fc', 'flip', 'train_size'))
def probabilities(variables: dict[str, Any], images: jax.Array, *, model, dense_fc: bool,
                  flip: bool, train_size: int) -> jax.Array:
  """Softmax posteriors (N, num_classes) of each image of a batch, in float32.

  Args:
    variables: the model's variables.
    images: (N, H, W, C) crops or whole images.
    model: the (unbound) classifier; static, so a model compiles once per shape.
    dense_fc: score the 'fc' head densely (`fc_as_conv`) and average the score
      map; otherwise the model itself (crops, or the 'gap' head, whose global
      average pool before a linear layer already averages the score map).
    flip: average with the posteriors of the horizontally mirrored images.
    train_size: `config.image_size` (for `dense_fc`).
  """
  def posterior(x):
    if dense_fc:
      features = model.clone(head='none', pooling='').apply(variables, x)
      scores = fc_as_conv(variables['params'], features, train_size).mean(axis=(1, 2))
    else:
      scores = model.apply(variables, x)
    return jax.nn.softmax(scores.astype(jnp.float32))

  if flip:
    return (posterior(images) + posterior(images[:, :, ::-1])) / 2
  return posterior(images)


def _split_size(builder, info: input_pipeline.DatasetInfo, split: str) -> int:
  return (info.num_eval_examples if split == info.eval_split
          else builder.info.splits[split].num_examples)


def posteriors(model, variables: dict[str, Any], config: ml_collections.ConfigDict, builder,
               info: input_pipeline.DatasetInfo, split: str, view: str, scale: int,
               on_batch: Callable[[int], None] | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
  """Per-example posteriors of one view of the protocol at one test scale Q.

  Runs on one process, the batch sharded over its devices. The posteriors of
  an example's views (crops, mirrors) are averaged.

  Args:
    model, variables: from `transfer.restore_model` (or any `models.VGG` and its variables).
    config: uses `image_size`, `eval.grid`, `eval.flip`, `eval_batch_size`, `input.*`.
    builder, info: from `input_pipeline.get_builder` and `dataset_info`.
    split: the split to evaluate.
    view: 'center', 'dense' or 'multicrop' (see `input_pipeline.protocol_batches`).
    scale: Q, the smaller side of the rescaled test image.
    on_batch: called after each batch with the number of examples seen so far
      (an example's crops may span batches).

  Returns:
    (probs float64 (N, num_classes), labels int32 (N,)), rows in split order.
  """
  config = input_pipeline.with_constants(config, info.mean, info.std)  # The run's.
  head = getattr(model, 'head', 'gap')  # Models without a `head` field pool globally.
  if view == 'dense' and head not in ('fc', 'gap'):
    raise ValueError(f'config.model.head={head!r} cannot be evaluated densely: it has no '
                     "classifier; use a model with head 'fc' or 'gap'.")
  mesh = step_lib.create_mesh()
  images_sharding = NamedSharding(mesh, P('data'))
  variables = jax.device_put({k: v for k, v in variables.items() if v}, NamedSharding(mesh, P()))
  predict = functools.partial(
      probabilities, model=model, dense_fc=view == 'dense' and head == 'fc',
      flip=view != 'center' and config.eval.flip, train_size=config.image_size)
  n = _split_size(builder, info, split)
  sums, counts = np.zeros((n, model.num_classes)), np.zeros(n, np.int64)
  labels = np.zeros(n, np.int32)

  def add(probs, batch):
    real = batch['mask'] > 0
    index = batch['index'][real]
    np.add.at(sums, index, np.asarray(probs)[real])
    np.add.at(counts, index, 1)
    labels[index] = batch['label'][real]
    if on_batch:
      on_batch(int(np.count_nonzero(counts)))

  pending = None  # The device works on batch k while the host adds up batch k - 1.
  for batch in input_pipeline.protocol_batches(config, builder, split, view, scale):
    probs = predict(variables, jax.device_put(batch['image'], images_sharding))
    if pending:
      add(*pending)
    pending = probs, batch
  if pending:
    add(*pending)
  if not counts.all():
    raise RuntimeError(f'{n - np.count_nonzero(counts)} of {n} examples of split {split!r} '
                       'were not evaluated; the split changed while it was read?')
  return sums / counts[:, None], labels


def protocol_posteriors(model, variables: dict[str, Any], config: ml_collections.ConfigDict,
                        builder, info: input_pipeline.DatasetInfo, split: str,
                        progress: Callable[[str], None] | None = None,
                        every_s: float = 10.0) -> tuple[np.ndarray, np.ndarray]:
  """The posteriors of `config.eval`: averaged over its views and test scales.

  Args:
    progress: given, called every `every_s` seconds and at the end of each
      pass with 'evaluating: done/total examples (pct%), ETA ...', counting one
      pass over the split per view and scale.

  Returns:
    (probs float64 (N, num_classes), labels int32 (N,)).
  """
  scales = config_lib.eval_scales(config)
  runs = [(view, q) for view in MODE_VIEWS[config.eval.mode] for q in scales]
  n, start = _split_size(builder, info, split), time.perf_counter()
  last, shown = start, -1

  def on_batch(passes: int, seen: int) -> None:
    nonlocal last, shown
    now, done = time.perf_counter(), passes * n + seen
    if progress and done != shown and (now - last >= every_s or seen == n):
      last, shown = now, done
      progress('evaluating: ' + reporting.countdown(done, n * len(runs), now - start,
                                                    'examples'))
  total = 0.0  # A running sum: one (N, classes) array at a time, not one per run.
  for i, (view, q) in enumerate(runs):
    probs, labels = posteriors(model, variables, config, builder, info, split, view, q,
                               functools.partial(on_batch, i))
    total = total + probs
  return total / len(runs), labels


def protocol_metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
  """Loss (mean -log p[label]), top-1 and top-5 accuracy of final posteriors."""
  k = min(5, probs.shape[-1])
  top_k = np.argsort(-probs, axis=-1, kind='stable')[:, :k]  # Ties: the lower class first.
  hits = top_k == labels[:, None]
  p_label = probs[np.arange(len(labels)), labels]
  return {'eval_loss': float(np.mean(-np.log(np.maximum(p_label, MIN_PROBABILITY)))),
          'eval_accuracy': float(np.mean(hits[:, 0])),
          'eval_top5_accuracy': float(np.mean(np.any(hits, axis=-1)))}


def evaluate_variables(model, variables: dict[str, Any], config: ml_collections.ConfigDict,
                       builder, info: input_pipeline.DatasetInfo,
                       split: str = '') -> dict[str, Any]:
  """`config.eval`'s protocol on a model's variables in memory (the trainer's `eval.at_end`).

  Returns:
    {'eval_loss', 'eval_accuracy', 'eval_top5_accuracy', 'protocol'}.
  """
  scales = config_lib.eval_scales(config)
  _check_protocol(config, scales)
  probs, labels = protocol_posteriors(model, variables, config, builder, info,
                                      split or info.eval_split)
  return {**protocol_metrics(probs, labels),
          'protocol': describe(config.eval.mode, scales, config.eval.grid, config.eval.flip)}


def _check_protocol(config: ml_collections.ConfigDict, scales: tuple[int, ...]) -> None:
  """Fails before any checkpoint or data is read."""
  if config.model.head == 'none':
    raise ValueError("config.model.head='none' cannot be evaluated: the model outputs "
                     "features, not class scores; evaluate a model with head 'fc' or 'gap'.")
  field = 'eval_batch_size' if config.eval_batch_size else 'batch_size'
  batch_size = config.eval_batch_size or config.batch_size
  if batch_size % jax.device_count():
    raise ValueError(f'config.{field}={batch_size} is not allowed: the evaluation batch is '
                     f'split over the {jax.device_count()} devices; use a multiple of that.')
  if (config.eval.mode, len(scales)) != ('center', 1) and jax.process_count() > 1:
    raise ValueError(f'config.eval.mode={config.eval.mode!r} at scales {scales} runs on one '
                     f'process, not {jax.process_count()}: evaluate on one host, or use '
                     "eval.mode='center' with one scale.")


def evaluate_workdir(workdir: str, config_overrides: dict[str, Any] | None = None,
                     split: str = '', checkpoint: str = 'best',
                     progress: Callable[[str], None] | None = None) -> dict[str, Any]:
  """Loss, top-1 and top-5 of a workdir's checkpoint on a split.

  With `eval.mode='center'` and one scale this is the trainer's evaluation
  (on any number of processes); every other protocol (`config.eval`) averages
  per-example posteriors on one process.

  Args:
    workdir: a training workdir (config.json, dataset.json, checkpoints/).
    config_overrides: {'eval_batch_size': 64, 'eval.mode': 'dense', ...} over the
      run's config.
    split: '' = the run's eval split.
    checkpoint: 'best' (falls back to latest) or 'latest'.
    progress: called with progress lines of the multi-view protocols.

  Returns:
    {'eval_loss', 'eval_accuracy', 'eval_top5_accuracy', 'step', 'num_examples',
     'protocol'}; 'protocol' is `describe`'s summary of `config.eval`.
  """
  config = run_config.load_config(workdir)
  dataset = workdirs.Workdir(workdir).read_dataset()
  # Normalised as in training: with the constants the run recorded (maybe measured).
  config = input_pipeline.with_constants(config, dataset.get('mean'), dataset.get('std'))
  config = run_config.apply_overrides(config, config_overrides)
  config_lib.validate(config)
  scales = config_lib.eval_scales(config)
  _check_protocol(config, scales)
  model, variables, step = transfer.restore_model(workdir, config, checkpoint)
  builder = input_pipeline.get_builder(config)
  info = input_pipeline.dataset_info(config, builder)
  split = split or info.eval_split
  _check_held_out(config, info, dataset, split)
  if (config.eval.mode, len(scales)) == ('center', 1):
    config.input.eval_resize = scales[0]
    mesh = step_lib.create_mesh()
    replicated, data_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))
    state = step_lib.TrainState.create(apply_fn=model.apply, params=variables['params'],
                                    tx=optax.identity(), batch_stats=variables['batch_stats'],
                                    rng=jax.random.PRNGKey(0))
    state = jax.device_put(state, replicated)
    p_eval = step_lib.make_eval_step(config, mesh)
    batches = input_pipeline.eval_batches(config, builder, info, split,
                                          normalized=not config.input.get('uint8_transfer'))
    results = step_lib.evaluate(p_eval, state, batches, data_sharding)
  else:
    results = protocol_metrics(*protocol_posteriors(model, variables, config, builder, info,
                                                    split, progress))
  return {**results, 'step': step, 'num_examples': _split_size(builder, info, split),
          'protocol': describe(config.eval.mode, scales, config.eval.grid, config.eval.flip)}


def _check_held_out(config: ml_collections.ConfigDict, info: input_pipeline.DatasetInfo,
                    dataset: dict[str, Any], split: str) -> None:
  """A folder split by `validation_split` must hold out the files it held out in training:
  files added since can move trained-on files into the held-out ones."""
  recorded = dataset.get('eval_files_sha256')
  if (config.get('validation_split') and recorded and split == info.eval_split
      and recorded != info.eval_files_sha256):
    raise input_pipeline.DataError(
        f'the files that config.validation_split={config.validation_split} holds out of '
        f'{config.data_dir} are not the ones the run held out (dataset.json): the folder changed '
        'since training, and some may have been trained on. Evaluate it as it was.')


def describe(mode: str, scales: tuple[int, ...], grid: int, flip: bool) -> str:
  """'dense+multicrop 5x5 +flip, Q=256,384,512': the protocol in a few words."""
  views = mode + (f' {grid}x{grid}' if 'multicrop' in mode else '')
  views += ' +flip' if flip and mode != 'center' else ''
  return f'{views}, Q={",".join(map(str, scales))}'


def define_flags() -> None:
  """The CLI's flags; defined only when run as a script (vgg_flax.train defines --workdir)."""
  if 'workdir' not in flags.FLAGS:
    flags.DEFINE_string('workdir', None, 'A training workdir.')
  flags.mark_flag_as_required('workdir')
  flags.DEFINE_string('split', '', "Split to evaluate; '' = the run's eval split.")
  flags.DEFINE_enum('checkpoint', 'best', ('best', 'latest'), 'Which checkpoint.')


def split_config_overrides(argv: list[str]) -> tuple[list[str], dict[str, str]]:
  """Takes the --config.FIELD=VALUE arguments out of argv."""
  rest, overrides = [], {}
  for arg in argv:
    if arg.startswith('--config.') and '=' in arg:
      key, value = arg[len('--config.'):].split('=', 1)
      overrides[key] = value
    else:
      rest.append(arg)
  return rest, overrides


def main(argv, overrides):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)  # Keep orbax and tfds chatter off the output.
  f = flags.FLAGS
  r = evaluate_workdir(f.workdir, overrides, f.split, f.checkpoint,
                       progress=lambda line: print(line, file=sys.stderr, flush=True))
  print(f'{f.workdir} step {r["step"]}, {r["num_examples"]} examples, {r["protocol"]}: '
        f'loss {r["eval_loss"]:.4f}  top-1 {r["eval_accuracy"]:.4f}  '
        f'top-5 {r["eval_top5_accuracy"]:.4f}')


if __name__ == '__main__':
  _argv, _overrides = split_config_overrides(sys.argv)
  cli.run(lambda argv: main(argv, _overrides), define_flags, argv=_argv)
