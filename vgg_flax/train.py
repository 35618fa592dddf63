"""The training loop and its CLI: checks, lease, resume, steps, evaluations, checkpoints.

Run it with:

  python -m vgg_flax.train --config=configs/vgg16.py --workdir=runs/vgg16 \
      --config.model.depth=19

The step itself (`vgg_flax.training.step`) is sharded over a 1-D `data` mesh axis
spanning every device of every process, with the train state replicated and
donated. Metrics stay on the device and are pulled to the host only every
`log_every_steps` steps, and before each checkpoint (which must be finite).
The workdir may be local or a bucket (`gs://`): every file goes through
`vgg_flax.io.storage` or orbax. The parts the loop calls are in
`vgg_flax.training`: `launch` (what it sets up), `train_reports`, `optim`'s
plateau rule, `checkpoint` and `lease`.
"""

from __future__ import annotations

import dataclasses
import json
import logging as std_logging
import os
import sys
import time
from typing import Any

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
from ml_collections import config_flags
import numpy as np

from vgg_flax import config as config_lib
from vgg_flax.data import input_pipeline
from vgg_flax import evaluate
from vgg_flax.io import clients
from vgg_flax.io import storage
from vgg_flax.io import workdirs
from vgg_flax import models
from vgg_flax.runtime import cli
from vgg_flax.runtime import multihost
from vgg_flax.runtime import preemption
from vgg_flax.training import checkpoint
from vgg_flax.training import launch
from vgg_flax.training import lease
from vgg_flax.training import optim
from vgg_flax.training import preflight
from vgg_flax.training import profiling
from vgg_flax.training import reporting
from vgg_flax.training import step as step_lib
from vgg_flax.training import train_reports


def _is_better(value: float, best: float | None, mode: str) -> bool:
  return best is None or (value > best if mode == 'max' else value < best)


def _protocol(config: ml_collections.ConfigDict) -> str:
  e = config.eval
  return evaluate.describe(e.mode, config_lib.eval_scales(config), e.grid, e.flip)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       display: train_reports.Display | None = None) -> dict[str, float]:
  """Trains `config` in `workdir` (a local folder or gs://), resuming from its latest checkpoint.

  The config and the workdir are checked first, then the workdir's lease is
  taken (a second trainer on the same workdir stops here, before any
  compilation), then data is read and the step compiled. `display` shows the
  reports besides the log (`vgg_flax.fit`'s progress bar).

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
  clients.set_timeout(config.storage.timeout_s)
  preflight.check_training_config(config)
  preflight.check_writable(workdir)
  with lease.hold_everywhere(workdir, stale_after_s=config.lease.stale_after_s,
                             refresh_s=config.lease.refresh_s) as held:
    changed = preflight.check_workdir(workdir, config)
    return _train(config, workdir, changed, held, display)


def _train(config: ml_collections.ConfigDict, workdir: str, changed: tuple[str, ...],
           held: lease.Lease | None, display: train_reports.Display | None) -> dict[str, float]:
  """The body of `train_and_evaluate`, once the workdir is checked and leased."""
  setup, state = launch.set_up(config, workdir)
  state, meta = checkpoint.restore_or_init(setup.ckpt, state, config, changed)
  start_step = int(jax.device_get(state.step))
  if meta['stopped_early'] or start_step >= setup.total_steps:
    try:
      return _already_finished(setup, state, meta, start_step)
    finally:
      setup.ckpt.close()
  if jax.process_index() == 0:
    storage.write_text(setup.run.config, config.to_json_best_effort(indent=2))
    storage.write_json(setup.run.dataset,
                       dataclasses.asdict(setup.info) | {'num_model_classes': setup.num_classes})
  state, meta, step = _train_steps(setup, state, meta, start_step, held, display)
  finished = meta['stopped_early'] or step >= setup.total_steps
  if jax.process_index() == 0:
    reporting.plot_curves(setup.run.metrics, setup.run.curves)
    if finished:
      write_result(workdir, step, setup.total_steps, meta, models.count_params(state.params),
                   setup.flops_per_image, json.loads(config.to_json_best_effort()))
  return meta['eval']


def _already_finished(setup: launch.Setup, state, meta: dict[str, Any],
                      step: int) -> dict[str, float]:
  """A finished run launched again: nothing is trained, and nothing it wrote is
  relabelled with this launch's config; a missing result.json is completed."""
  config, workdir = setup.config, setup.workdir
  current = json.loads(config.to_json_best_effort())
  saved = setup.run.read_config() if setup.run.has_config() else current
  differ = [k for k in preflight.changed_fields(saved, current) if not preflight.is_free(k)]
  logging.info('Training in %s already finished at step %d; nothing to train.', workdir, step)
  if differ:
    logging.warning('It was trained with other settings than this launch asks (%s); %s and %s '
                    'keep the ones it was trained with. Use a new --workdir to train with '
                    'these.', preflight.describe_changes(saved, current, differ),
                    workdirs.CONFIG_FILE, workdirs.RESULT_FILE)
  if jax.process_index() == 0 and not storage.exists(setup.run.result):
    # Killed between its last checkpoint and its result: completed from what it saved.
    if config.eval.at_end and meta.get('final_eval') is None:
      writer = reporting.create_writer(workdir, resume_step=step)
      try:
        meta['final_eval'] = _final_evaluation(setup, state, step, writer)
      finally:
        writer.close()
    write_result(workdir, step, setup.total_steps, meta, models.count_params(state.params),
                 setup.flops_per_image, saved)
  return meta['eval']


def _train_steps(setup: launch.Setup, state, meta: dict[str, Any], start_step: int,
                 held: lease.Lease | None, display: train_reports.Display | None):
  """Trains from `start_step` to the end, an early stop, a lost lease or a signal.

  Returns:
    `(state, meta, step)`: the last step trained, checkpointed.
  """
  config, workdir, ckpt = setup.config, setup.workdir, setup.ckpt
  total_steps = setup.total_steps
  eval_every = config.eval_every_epochs * setup.steps_per_epoch
  # uint8 batches are normalised in the step: with the run's constants (dataset_info).
  step_config = input_pipeline.with_constants(config, setup.info.mean, setup.info.std)
  layout = step_lib.shardings_of(state)
  p_train = step_lib.make_train_step(step_config, setup.learning_rate_fn, setup.mesh, layout)
  p_eval = step_lib.make_eval_step(step_config, setup.mesh, layout)
  writer = reporting.create_writer(workdir, resume_step=start_step)
  progress = reporting.Progress(total_steps, config.batch_size, start_step)
  normalized = not config.input.uint8_transfer
  stream = input_pipeline.train_batches(config, setup.builder, setup.info, start_step=start_step,
                                        end_step=total_steps, normalized=normalized)
  batches = step_lib.prefetch_to_mesh(stream, setup.data_sharding)
  logging.info('Training %s for %d steps (%d per epoch) on %d devices.',
               type(setup.model).__name__, total_steps, setup.steps_per_epoch,
               jax.device_count())
  logging.info('Evaluating every %d steps: centre crop at Q=%d (eval_*)%s.', eval_every,
               config_lib.eval_scale(config),
               f"; after the last step, {_protocol(config)} (final_eval_*)"
               if config.eval.at_end else '')
  reports = train_reports.Reports(setup, writer, progress, display)
  profiler = profiling.StepProfiler(workdir, tuple(config.profile_steps))
  step = start_step
  try:
    with preemption.Watcher() as preempted:
      for step in range(start_step + 1, total_steps + 1):
        if held is not None and jax.process_count() == 1 and held.lost.is_set():
          _raise_lease_lost(workdir, step, ckpt)
        if held is not None and (failed := held.failed()) is not None:
          raise failed  # The lease's storage stopped answering.
        profiler.before(step)
        state, metrics = p_train(state, next(batches))
        profiler.after(step, state)
        reports.pending.append(metrics)
        if step == start_step + 1:  # Compilation: kept out of the throughput.
          logging.info('First step (compilation included) took %.1f s.',
                       progress.restart_after(metrics, step))
        is_eval = step % eval_every == 0 or step == total_steps
        is_save = bool(config.checkpoint.every_steps) and step % config.checkpoint.every_steps == 0
        stop = preempted(step)
        # A checkpoint is only written after the steps before it were checked.
        if step % config.log_every_steps == 0 or is_eval or is_save or stop:
          if reports.pending:
            reports.train(step)
          if jax.process_count() > 1 and lease.lost_everywhere(held):
            _raise_lease_lost(workdir, step, ckpt)
        if is_eval:
          state, meta = _evaluate(setup, p_eval, state, meta, step, reports)
          _save(setup, state, meta, progress, writer, best=meta['improved'])
          if config.eval.at_end and (meta['stopped_early'] or step == total_steps):
            ckpt.wait()  # The last checkpoint is safe before a long, memory-hungry protocol.
            with progress.paused():
              meta['final_eval'] = _final_evaluation(setup, state, step, writer)
          if meta['stopped_early']:
            logging.info('Early stop at step %d: %s has not improved for %d evaluations.',
                         step, config.checkpoint.monitor, config.early_stopping_patience)
            break
        elif is_save or stop:
          _save(setup, state, meta, progress, writer)
        if stop:
          ckpt.wait()
          logging.warning('Stopped by %s: saved step %d in %s; run the same command to resume.',
                          preempted.signal, step, workdir)
          break
  finally:  # Whatever stopped the loop, saves in flight reach the disk...
    stream.close()  # Here, not whenever (and in whichever thread) the GC gets to it.
    # ...unless the storage stopped answering (waited for already) or a peer is dead.
    silent = isinstance(sys.exc_info()[1], storage.StorageTimeoutError)
    if not silent and not multihost.is_peer_gone(sys.exc_info()[1]):
      ckpt.wait()
      ckpt.close()
    if not silent:
      writer.close()
  meta.pop('improved', None)
  return state, meta, step


def _raise_lease_lost(workdir: str, step: int, ckpt: checkpoint.Checkpointer):
  raise lease.WorkdirInUseError(
      f'workdir {workdir}: another trainer took over its lease; stopped at step {step} '
      f'(the last checkpoint, step {ckpt.latest_step()}, is kept).')


def _evaluate(setup: launch.Setup, p_eval, state, meta: dict[str, Any], step: int,
              reports: train_reports.Reports):
  """The centre-crop evaluation at Q, the best so far, early stopping and the plateau rule.

  Returns:
    `(state, meta)`: meta['improved'] says whether this evaluation is the best.
  """
  config, workdir = setup.config, setup.workdir
  with reports.progress.paused() as timer:
    eval_batches = input_pipeline.eval_batches(config, setup.builder, setup.info,
                                               normalized=not config.input.uint8_transfer)
    results = step_lib.evaluate(p_eval, state, eval_batches, setup.data_sharding)
  reports.evaluation(step, results, timer.seconds)
  if not all(np.isfinite(v) for v in results.values()):
    raise FloatingPointError(
        f'Evaluation at step {step} is not finite ({results}); not saved, no result. '
        f'The last good checkpoint (step {setup.ckpt.latest_step()}) is kept in {workdir}.')
  value = results[config.checkpoint.monitor]
  improved = _is_better(value, meta['best'], config.checkpoint.mode)
  meta = dict(meta, best=value if improved else meta['best'], eval=results, improved=improved,
              evals_without_improvement=0 if improved else meta['evals_without_improvement'] + 1)
  if config.schedule.name == 'plateau':
    state, meta['plateau'] = optim.apply_plateau(
        state, meta['plateau'], step, improved, config=config, sharding=setup.replicated,
        learning_rate_fn=setup.learning_rate_fn)
    reports.writer.write_scalars(step, {'lr_scale': meta['plateau']['scale']})
  patience = config.early_stopping_patience
  meta['stopped_early'] = bool(patience and meta['evals_without_improvement'] >= patience)
  return state, meta


def _save(setup: launch.Setup, state, meta: dict[str, Any], progress: reporting.Progress, writer,
          best: bool = False) -> None:
  """Checkpoints `state` once it is known to be finite (else raises)."""
  step = int(jax.device_get(state.step))
  finite = step_lib.all_finite((state.params, state.batch_stats, state.opt_state))
  if not bool(jax.device_get(finite)):
    raise FloatingPointError(
        f'The train state at step {step} is not finite; not saved. The last good checkpoint '
        f'(step {setup.ckpt.latest_step()}) is kept in {setup.workdir}; lower the learning rate.')
  with progress.paused():
    setup.ckpt.wait()  # Within storage's deadline; orbax's save would wait for the last one without.
    setup.ckpt.save(state, {k: v for k, v in meta.items() if k != 'improved'}, best=best)
    writer.flush()  # On a bucket, metrics.jsonl then holds every row up to the checkpoint.


def _final_evaluation(setup: launch.Setup, state, step: int, writer) -> dict[str, Any] | None:
  """config.eval's protocol on the final state (eval.at_end), written as final_eval_*."""
  config = setup.config
  if jax.process_count() > 1:
    logging.warning('eval.at_end: %s runs on one process; run python -m vgg_flax.evaluate '
                    '--workdir=%s --checkpoint=latest on one host instead.', _protocol(config),
                    setup.workdir)
    return None
  start = time.perf_counter()
  results = evaluate.evaluate_variables(
      setup.model, {'params': state.params, 'batch_stats': state.batch_stats}, config,
      setup.builder, setup.info)
  seconds = time.perf_counter() - start
  scalars = {f'final_{k}': v for k, v in results.items() if k.startswith('eval_')}
  writer.write_scalars(step, {**scalars, 'final_eval_seconds': seconds})
  logging.info('final evaluation at step %d (%s): %s (%.1f s)', step, results['protocol'],
               ' '.join(f'{k}={v:.4f}' for k, v in scalars.items()), seconds)
  return results


def write_result(workdir: str, step: int, total_steps: int, meta: dict[str, Any],
                 num_params: int, flops_per_image: float, config: dict[str, Any]) -> None:
  """WORKDIR/result.json: the finished run's last and best evaluation, its size,
  and the config it was trained with, as JSON (the sweep runner compares it with its own)."""
  result = {'step': int(step), 'total_steps': int(total_steps),
            'stopped_early': bool(meta['stopped_early']), 'eval': meta['eval'],
            'best': meta['best'], 'final_eval': meta.get('final_eval'),
            'num_params': int(num_params),
            'train_flops_per_image': float(flops_per_image), 'config': config}
  storage.write_json(workdirs.Workdir(workdir).result, result)


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
  flags.DEFINE_integer(
      'heartbeat_timeout_s', multihost.HEARTBEAT_TIMEOUT_S, 'Several processes: when one '
      'dies, the others stop within this many seconds, saying how to resume.')


class _QuietLibraries(std_logging.Filter):
  """Keeps the libraries' INFO chatter (a line per save, per scalar write, per
  tf.data read) out of the log: the progress and eval lines say it all."""

  CHATTY = ('/orbax/', '/tensorflow_datasets/', '/jax/_src/')

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
    multihost.initialize(f.coordinator_address, f.num_processes, f.process_id,
                         f.heartbeat_timeout_s)
  with multihost.stop_if_a_peer_dies(f.workdir, f.heartbeat_timeout_s):
    try:
      train_and_evaluate(f.config, f.workdir)
    except storage.StorageTimeoutError as e:
      # Threads still blocked on the storage (orbax's writes) cannot be stopped,
      # and Python would wait for them at exit: say why, and exit now.
      print(f'error: {e}', file=sys.stderr, flush=True)
      os._exit(cli.FAILURE)  # pylint: disable=protected-access


if __name__ == '__main__':
  cli.run(main, define_flags)
