"""The training loop and its CLI: checks, lease, resume, steps, evaluations, checkpoints.

Run it with:

  python -m vgg_flax.train --config=configs/vgg16.py --workdir=runs/vgg16 \
      --config.model.depth=19

The step itself (`vgg_flax.step`) is sharded over a 1-D `data` mesh axis
spanning every device of every process, with the train state replicated and
donated. Metrics stay on the device and are pulled to the host only every
`log_every_steps` steps, and before each checkpoint (which must be finite).
The workdir may be local or a bucket (`gs://`): every file goes through
`vgg_flax.storage` or orbax.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging as std_logging
import os
from typing import Any

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
from ml_collections import config_flags
import numpy as np

from vgg_flax import checkpoint
from vgg_flax import cli
from vgg_flax import config as config_lib
from vgg_flax import evaluate
from vgg_flax import flops
from vgg_flax import input_pipeline
from vgg_flax import lease
from vgg_flax import models
from vgg_flax import optim
from vgg_flax import preemption
from vgg_flax import preflight
from vgg_flax import reporting
from vgg_flax import step as step_lib
from vgg_flax import storage
from vgg_flax import transfer

CONFIG_FILE = preflight.CONFIG_FILE
DATASET_FILE = evaluate.DATASET_FILE  # Class names and channels, for predict and evaluate.
RESULT_FILE = 'result.json'  # Written once training has finished: the sweep runner's signal.


def _is_better(value: float, best: float | None, mode: str) -> bool:
  return best is None or (value > best if mode == 'max' else value < best)


def _protocol(config: ml_collections.ConfigDict) -> str:
  e = config.eval
  return evaluate.describe(e.mode, config_lib.eval_scales(config), e.grid, e.flip)


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains `config` in `workdir` (a local folder or gs://), resuming from its latest checkpoint.

  The config and the workdir are checked first, then the workdir's lease is
  taken (a second trainer on the same workdir stops here, before any
  compilation), then data is read and the step compiled.

  Returns:
    The metrics of the last evaluation.

  Raises:
    ValueError: a config training cannot use, or one another run in `workdir`.
    lease.WorkdirInUseError: another live trainer holds the workdir.
    FloatingPointError: the loss, a gradient, the state or an evaluation
      became non-finite (on_nonfinite='stop'; an evaluation always). Nothing
      non-finite is ever checkpointed, and result.json is not written.
  """
  config_lib.validate(config)
  preflight.check_training_config(config)
  preflight.check_writable(workdir)
  with _workdir_lease(workdir, config) as held:
    changed = preflight.check_workdir(workdir, config)
    return _train(config, workdir, changed, held)


@contextlib.contextmanager
def _workdir_lease(workdir: str, config: ml_collections.ConfigDict):
  """The workdir's lease, held by process 0; every process stops if it is refused."""
  with contextlib.ExitStack() as stack:
    error, held = None, None
    try:
      held = stack.enter_context(lease.hold(workdir, stale_after_s=config.lease.stale_after_s,
                                            refresh_s=config.lease.refresh_s))
    except lease.WorkdirInUseError as e:
      error = e
    if jax.process_count() > 1:  # The other processes learn process 0's answer.
      ok = bool(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
      if not ok and error is None:
        error = lease.WorkdirInUseError(f'workdir {workdir} is in use (refused on process 0).')
    if error is not None:
      raise error
    yield held


def _train(config: ml_collections.ConfigDict, workdir: str, changed: tuple[str, ...],
           held: lease.Lease | None) -> dict[str, float]:
  """The body of `train_and_evaluate`, once the workdir is checked and leased."""
  run_dir = storage.path(workdir)
  builder = input_pipeline.get_builder(config)
  info = input_pipeline.dataset_info(config, builder)
  num_classes = config.model.num_classes or info.num_classes
  if num_classes < info.num_classes:
    raise ValueError(f'config.model.num_classes={num_classes} but {info.name} has '
                     f'{info.num_classes} classes; leave it unset to take the dataset\'s.')

  steps_per_epoch = input_pipeline.steps_per_epoch(config, info)
  total_steps = config.num_epochs * steps_per_epoch
  eval_every = config.eval_every_epochs * steps_per_epoch
  mesh = step_lib.create_mesh()
  replicated, data_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))

  model, tx, learning_rate_fn = step_lib.create_model_and_optimizer(config, num_classes,
                                                                    steps_per_epoch)
  flops_per_image = flops.train_flops(model, config.image_size, info.num_channels)
  peak_flops, peak_source = flops.device_peak_flops()
  logging.info('%.2f GFLOP per training image; peak %.0f GFLOP/s per device (%s).',
               flops_per_image / 1e9, peak_flops / 1e9, peak_source)
  state = step_lib.create_train_state(model, tx, config, info.num_channels, replicated)
  preflight.check_disk_space(workdir, state)
  ckpt = checkpoint.Checkpointer(workdir, keep=config.checkpoint.keep)
  meta = {'best': None, 'evals_without_improvement': 0, 'stopped_early': False, 'eval': {}}
  # The paper's plateau: the host decides at evaluations, the state carries the scale.
  plateau = config.schedule.name == 'plateau'
  restored = ckpt.restore(state, new_optimizer_ok='freeze' in changed)
  if restored:
    state, meta = restored
    logging.info('Resumed from step %d of %s.', int(state.step), workdir)
    if meta.pop('new_optimizer_state', False):
      logging.warning('config.freeze changed (%s): restored parameters and batch statistics, '
                      'with a fresh optimiser state.', ', '.join(config.freeze) or 'nothing')
      meta.pop('plateau', None)  # The fresh state's rate starts over.
  elif config.init_from:
    state = transfer.load_init(state, config)
  if plateau:
    meta.setdefault('plateau', optim.new_plateau_record())
  start_step = int(jax.device_get(state.step))
  if jax.process_index() == 0:
    storage.write_text(run_dir / CONFIG_FILE, config.to_json_best_effort(indent=2))
    storage.write_json(run_dir / DATASET_FILE,
                       dataclasses.asdict(info) | {'num_model_classes': num_classes})
  if meta['stopped_early'] or start_step >= total_steps:
    logging.info('Training in %s already finished at step %d.', workdir, start_step)
    if jax.process_index() == 0:
      # Written again: the run may have been killed before it, or the file may
      # predate a change of bookkeeping fields (the sweep compares configs).
      write_result(workdir, start_step, total_steps, meta, models.count_params(state.params),
                   flops_per_image, config)
    return meta['eval']

  p_train = step_lib.make_train_step(config, learning_rate_fn, mesh)
  p_eval = step_lib.make_eval_step(config, mesh)

  writer = reporting.create_writer(workdir, resume_step=start_step)
  progress = reporting.Progress(total_steps, config.batch_size, start_step)
  stream = input_pipeline.train_batches(config, builder, info, start_step=start_step,
                                        end_step=total_steps,
                                        normalized=not config.input.uint8_transfer)
  batches = step_lib.prefetch_to_mesh(stream, data_sharding)
  logging.info('Training %s for %d steps (%d per epoch) on %d devices.',
               type(model).__name__, total_steps, steps_per_epoch, jax.device_count())
  logging.info('Evaluating every %d steps: centre crop at Q=%d (eval_*)%s.', eval_every,
               config_lib.eval_scale(config),
               f"; after the last step, {_protocol(config)} (final_eval_*)"
               if config.eval.at_end else '')
  pending = []

  def report_train(step: int) -> None:
    """Pulls the pending step metrics (the loop's only host sync) and logs them."""
    fetched = jax.device_get(pending)
    pending.clear()
    bad = [m['nonfinite'] for m in fetched]
    if any(bad) and config.on_nonfinite == 'stop':
      first = step - len(fetched) + 1 + bad.index(True)
      raise FloatingPointError(
          f'Non-finite loss or gradient at step {first} (loss {fetched[bad.index(True)]["loss"]}); '
          f'stopped. The last good checkpoint (step {ckpt.latest_step()}) is kept in {workdir}; '
          "--config.on_nonfinite=skip skips such steps instead.")
    good = [m for m, b in zip(fetched, bad) if not b] or fetched
    scalars = {f'train_{k}': float(np.mean([m[k] for m in good]))
               for k in ('loss', 'accuracy', 'grad_norm')}
    scalars['learning_rate'] = float(fetched[-1]['learning_rate'])
    if any(bad):
      scalars['train_skipped_steps'] = float(sum(bad))
    speed = progress.update(step)
    mfu = flops.mfu(speed['images_per_sec'], flops_per_image, peak_flops * jax.device_count())
    logging.info(progress.line(step, step / steps_per_epoch, scalars, speed) + f' mfu={mfu:.1%}')
    writer.write_scalars(step, {**scalars, 'train_images_per_sec': speed['images_per_sec'],
                                'train_mfu': mfu})

  def save(step: int, best: bool = False) -> None:
    """Checkpoints `state` once it is known to be finite (else raises)."""
    if not bool(jax.device_get(_all_finite((state.params, state.batch_stats,
                                             state.opt_state)))):
      raise FloatingPointError(
          f'The train state at step {step} is not finite; not saved. The last good checkpoint '
          f'(step {ckpt.latest_step()}) is kept in {workdir}; lower the learning rate.')
    with progress.paused():
      ckpt.save(state, meta, best=best)
      writer.flush()  # On a bucket, metrics.jsonl then holds every row up to the checkpoint.

  def plateau_decision(step: int, improved: bool) -> step_lib.TrainState:
    """The paper's plateau rule at an evaluation; the state with the new scale if it drops."""
    s, old = config.schedule, meta['plateau']
    meta['plateau'] = optim.next_plateau(old, improved, step, patience=s.patience,
                                         factor=s.factor, min_scale=s.min_scale)
    scale = meta['plateau']['scale']
    writer.write_scalars(step, {'lr_scale': scale})
    if scale == old['scale']:
      return state
    # A replicated float32 scalar, like the leaf it replaces: the step does not recompile.
    value = jax.make_array_from_process_local_data(replicated, np.float32(scale))
    new_state = state.replace(opt_state=optim.set_plateau_scale(state.opt_state, value))
    lr = float(jax.device_get(learning_rate_fn(step, new_state.opt_state)))
    logging.info('%s has not improved for %d evaluations: learning rate x%g from step %d, now '
                 '%.3g (drop %d; scale %g).', config.checkpoint.monitor, s.patience, s.factor,
                 step + 1, lr, len(meta['plateau']['drops']), scale)
    return new_state

  def final_evaluation(step: int) -> dict[str, Any] | None:
    """config.eval's protocol on the final state (eval.at_end), written as final_eval_*."""
    if jax.process_count() > 1:
      logging.warning('eval.at_end: %s runs on one process; run python -m vgg_flax.evaluate '
                      '--workdir=%s --checkpoint=latest on one host instead.', _protocol(config),
                      workdir)
      return None
    with progress.paused() as timer:
      results = evaluate.evaluate_variables(
          model, {'params': state.params, 'batch_stats': state.batch_stats}, config, builder,
          info)
    scalars = {f'final_{k}': v for k, v in results.items() if k.startswith('eval_')}
    writer.write_scalars(step, {**scalars, 'final_eval_seconds': timer.seconds})
    logging.info('final evaluation at step %d (%s): %s (%.1f s)', step, results['protocol'],
                 ' '.join(f'{k}={v:.4f}' for k, v in scalars.items()), timer.seconds)
    return results

  try:
    with preemption.Watcher() as preempted:
      for step in range(start_step + 1, total_steps + 1):
        if held is not None and held.lost.is_set():
          raise lease.WorkdirInUseError(
              f'workdir {workdir}: another trainer took over its lease; stopped at step {step} '
              f'(the last checkpoint, step {ckpt.latest_step()}, is kept).')
        state, metrics = p_train(state, next(batches))
        pending.append(metrics)
        if step == start_step + 1:  # Compilation: kept out of the throughput.
          seconds = progress.restart_after(metrics, step)
          logging.info('First step (compilation included) took %.1f s.', seconds)
        is_eval = step % eval_every == 0 or step == total_steps
        is_save = bool(config.checkpoint.every_steps) and step % config.checkpoint.every_steps == 0
        stop = preempted(step)
        # A checkpoint is only written after the steps before it were checked.
        if step % config.log_every_steps == 0 or is_eval or ((is_save or stop) and pending):
          report_train(step)

        if is_eval:
          with progress.paused() as timer:
            eval_batches = input_pipeline.eval_batches(
                config, builder, info, normalized=not config.input.uint8_transfer)
            results = step_lib.evaluate(p_eval, state, eval_batches, data_sharding)
          writer.write_scalars(step, {**results, 'eval_seconds': timer.seconds})
          logging.info('eval at step %d: %s (%.1f s)', step,
                       ' '.join(f'{k}={v:.4f}' for k, v in results.items()), timer.seconds)
          if not all(np.isfinite(v) for v in results.values()):
            raise FloatingPointError(
                f'Evaluation at step {step} is not finite ({results}); not saved, no result. '
                f'The last good checkpoint (step {ckpt.latest_step()}) is kept in {workdir}.')
          value = results[config.checkpoint.monitor]
          improved = _is_better(value, meta['best'], config.checkpoint.mode)
          meta['best'] = value if improved else meta['best']
          meta['evals_without_improvement'] = (
              0 if improved else meta['evals_without_improvement'] + 1)
          if plateau:
            state = plateau_decision(step, improved)
          patience = config.early_stopping_patience
          meta['stopped_early'] = bool(patience and meta['evals_without_improvement'] >= patience)
          meta['eval'] = results
          if config.eval.at_end and (meta['stopped_early'] or step == total_steps):
            meta['final_eval'] = final_evaluation(step)  # Saved with the last checkpoint.
          save(step, best=improved)
          if meta['stopped_early']:
            logging.info('Early stop at step %d: %s has not improved for %d evaluations.',
                         step, config.checkpoint.monitor, patience)
            break
        elif is_save or stop:
          save(step)

        if stop:
          ckpt.wait()
          logging.warning('Stopped by %s: saved step %d in %s; run the same command to resume.',
                          preempted.signal, step, workdir)
          break
  finally:  # Whatever stopped the loop, saves in flight reach the disk.
    stream.close()  # Here, not whenever (and in whichever thread) the GC gets to it.
    ckpt.wait()
    ckpt.close()
    writer.close()
  if jax.process_index() == 0:
    reporting.plot_curves(run_dir / reporting.METRICS_FILE, run_dir / reporting.CURVES_FILE)
    if meta['stopped_early'] or step >= total_steps:
      write_result(workdir, step, total_steps, meta, models.count_params(state.params),
                   flops_per_image, config)
  return meta['eval']


def write_result(workdir: str, step: int, total_steps: int, meta: dict[str, Any],
                 num_params: int, flops_per_image: float,
                 config: ml_collections.ConfigDict) -> None:
  """WORKDIR/result.json: the finished run's last and best evaluation, its size,
  and the config it was trained with (the sweep runner compares it with its own)."""
  result = {'step': int(step), 'total_steps': int(total_steps),
            'stopped_early': bool(meta['stopped_early']), 'eval': meta['eval'],
            'best': meta['best'], 'final_eval': meta.get('final_eval'),
            'num_params': int(num_params),
            'train_flops_per_image': float(flops_per_image),
            'config': json.loads(config.to_json_best_effort())}
  storage.write_json(storage.path(workdir) / RESULT_FILE, result)


_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               'configs', 'default.py')


def define_flags() -> None:
  """The CLI's flags; defined only when run as a script, so that other entry points
  (evaluate, sweep) can import this module and define their own."""
  config_flags.DEFINE_config_file(
      'config', _DEFAULT_CONFIG, 'Config file (configs/*.py); override fields with '
      '--config.FIELD=VALUE.', lock_config=True)
  flags.DEFINE_string('workdir', None, 'Run folder: checkpoints, metrics, curves.',
                      required=True)
  flags.DEFINE_bool(
      'distributed', False, 'Call jax.distributed.initialize (multi-host). Implied by '
      '--coordinator_address; without the flags below JAX reads its environment (TPU pods, '
      'SLURM, JAX_COORDINATOR_ADDRESS, ...).')
  flags.DEFINE_string('coordinator_address', None, 'host:port of process 0.')
  flags.DEFINE_integer('num_processes', None, 'Number of processes.')
  flags.DEFINE_integer('process_id', None, 'Index of this process.')


class _QuietLibraries(std_logging.Filter):
  """Keeps the libraries' INFO chatter (a line per save, per scalar write, per
  tf.data read) out of the log: the progress and eval lines say it all."""

  CHATTY = ('/orbax/', '/clu/', '/tensorflow_datasets/', '/jax/_src/')

  def filter(self, record: std_logging.LogRecord) -> bool:
    return (record.levelno > std_logging.INFO
            or not any(part in record.pathname for part in self.CHATTY))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_QuietLibraries())
  f = flags.FLAGS
  if f.distributed or f.coordinator_address:
    jax.distributed.initialize(coordinator_address=f.coordinator_address,
                               num_processes=f.num_processes, process_id=f.process_id)
    logging.info('Process %d of %d; %d local and %d global devices.', jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())
  train_and_evaluate(f.config, f.workdir)


if __name__ == '__main__':
  cli.run(main, define_flags)
