"""The PCL training loop: epochs of E-step then M-steps, with logging and checkpoint cadence.

This module owns `train_and_evaluate` (the run: lock the workdir, resume, train the epochs,
save) and the `Trainer` (what a run builds once: data, model, jitted step, and the E-step that
turns the key encoder's features into a prototype bank). One step is `step`'s, the feature pass
`features`', clustering `clustering`'s, the cluster-count controller `cluster_schedule`'s; the
run's infrastructure (resuming, stop requests, run files, checkpoints, devices) is `run`'s.
"""

import functools
import logging
import math
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from pcl_jax import cluster_schedule
from pcl_jax import clustering
from pcl_jax.clustering import bank as bank_lib
from pcl_jax import configuration
from pcl_jax.configuration import UserError
from pcl_jax.data import loaders
from pcl_jax.data import resident as resident_lib
from pcl_jax.evaluation import knn
from pcl_jax.evaluation import protocol
from pcl_jax import features as features_lib
from pcl_jax import losses
from pcl_jax import models
from pcl_jax.run import checkpoint as checkpoint_lib
from pcl_jax.run import files as run_files
from pcl_jax.run import parallel
from pcl_jax.run import resume
from pcl_jax.run import stop as stop_lib
from pcl_jax import state as state_lib
from pcl_jax import step as step_lib

log = logging.getLogger(__name__)


def _epoch_summary(epoch, record) -> str:
  val = f" val_knn {record['val_knn_top1']:.2f}" if 'val_knn_top1' in record else ''
  proto = ''
  if record.get('loss_proto') is not None:
    proto = (f" loss_proto {record['loss_proto']:.3f} acc_proto {record['acc_proto']:.2f}"
             f" k={record['num_clusters']} eps={record['smoothing']:.3f}")
  return (f"epoch {epoch}: loss_inst {record['loss_inst']:.3f} acc_inst {record['acc_inst']:.2f}"
          f"{proto}{val} lr {record['lr']:.4g} {record['images_per_s']:.0f} img/s "
          f"{record['epoch_time_s']:.1f}s")


class Trainer:
  """Holds what a run builds once (data, model, jitted functions) and runs its epochs."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str,
               schedule: cluster_schedule.ClusterSchedule):
    """`config` as `configuration.validate` checked it, `schedule` what that built."""
    self.config, self.workdir, self.schedule = config, workdir, schedule
    self.datasets = loaders.build_train_datasets(config)
    configuration.validate_against_data(config, schedule, self.datasets.num_train)
    self.max_clusters = config.pcl.max_clusters or max(self.schedule.all_clusters)
    self.max_k = min(max(self.schedule.all_clusters), self.datasets.num_train)
    # The jax k-means's centroid rows for every k of the run (None: exact k), and the k-means
    # programs this process had compiled before the run (metrics' kmeans_compilations).
    self.kmeans_rows = clustering.padded_rows(config.clustering.pad_k, self.max_k)
    self.kmeans_compiled_before = clustering.kmeans_compilations()

    batch = config.train.batch_size
    parallel.check_batch_divides(batch)
    self.mesh = parallel.data_mesh()
    full_steps = self.datasets.num_train // batch
    self.steps_per_epoch = min(full_steps, config.train.steps_per_epoch or full_steps)
    self.tx = state_lib.make_optimizer(config.optim, state_lib.make_lr_schedule(
        config.optim, config.train.epochs, self.steps_per_epoch))
    self.model = models.encoder_from_config(config, bn_groups=config.train.shuffle_bn_groups)
    self.train_step = step_lib.make_train_step(config, self.model, self.mesh)
    self.embed = features_lib.make_embed_fn(self.model, mesh=self.mesh)
    # data.device_resident: the training set on the devices, batches gathered and drawn there.
    self.resident_images = self.resident_batch = None
    if config.data.device_resident:
      self.resident_images = resident_lib.place_images(self.datasets.train_eval.source.images,
                                                       self.mesh)
      self.resident_batch = resident_lib.make_batch_fn(self.mesh, config.data.aug_plus)
    self.val_dataset = None
    if config.eval.val_every:
      self.val_dataset = loaders.build_eval_dataset(config, config.data.val_split)
      if self.val_dataset.source.labels is None:
        raise UserError(f'eval.val_every={config.eval.val_every} scores a kNN against labels, '
                        f'and data.val_split={config.data.val_split!r} of data.root='
                        f'{config.data.root} is unlabelled images; set eval.val_every=0')

  def step_compilations(self) -> int:
    """How many programs the jitted train step has compiled (1 unless shapes changed)."""
    return self.train_step._cache_size()  # pylint: disable=protected-access

  def initial_state(self) -> state_lib.PCLState:
    """The initial state, replicated over the mesh (same seed -> same state on every process)."""
    create = functools.partial(state_lib.create_state, model=self.model, tx=self.tx,
                               image_size=self.config.data.image_size,
                               num_negatives=self.config.pcl.num_negatives)
    return jax.jit(create, out_shardings=parallel.replicated(self.mesh))(
        jax.random.PRNGKey(self.config.seed))

  def _embed_dataset(self, variables, dataset):
    resident = self.resident_images if dataset is self.datasets.train_eval else None
    return features_lib.extract_features(self.embed, variables, dataset,
                                         self.config.train.batch_size,
                                         self.config.data.num_workers, mesh=self.mesh,
                                         resident=resident)

  def _cluster(self, features, epoch: int):
    """Clusters every active level. faiss runs on host memory: in a multi-host run process 0
    clusters and broadcasts; the jax backend takes the (sharded) device array as it is."""
    config = self.config
    run = functools.partial(
        clustering.cluster_levels, num_clusters=self.schedule.clustering_order(),
        seed=config.seed * 1000 + epoch, pad_rows=self.kmeans_rows,
        **clustering.level_settings(config))
    if jax.process_count() == 1:
      return run(features)
    if clustering.resolve_backend(config.clustering.backend) == 'jax':
      # The global array, sharded over every process's devices: one SPMD k-means, whose
      # results come back replicated so each process holds the whole prototype bank.
      return [dict(level, **parallel.replicate(
          {key: level[key] for key in ('centroids', 'im2cluster', 'concentration')}, self.mesh))
              for level in run(features)]
    host_features = parallel.to_host(features)
    levels = run(host_features) if parallel.is_main_process() else [
        {'k': k, 'centroids': np.zeros((k, host_features.shape[1]), np.float32),
         'im2cluster': np.zeros(host_features.shape[0], np.int32),
         'concentration': np.zeros(k, np.float32), 'timing_s': 0.0}
        for k in self.schedule.clustering_order()]
    arrays = [{key: np.asarray(level[key]) for key in ('centroids', 'im2cluster',
                                                       'concentration')} for level in levels]
    arrays = parallel.broadcast_from_process0(arrays)
    return [dict(level, **shared) for level, shared in zip(levels, arrays)]

  def e_step(self, state, epoch: int):
    """Features of the key encoder, clustering of every active level, the prototype bank."""
    start = time.perf_counter()
    variables = {'params': state.key_params, 'batch_stats': state.key_batch_stats}
    features, _ = self._embed_dataset(variables, self.datasets.train_eval)
    if not bool(jnp.isfinite(features).all()):
      raise FloatingPointError(
          f'non-finite features in the E-step of epoch {epoch}: the key encoder diverged; '
          'training stopped and the last checkpoint is kept. Lower optim.lr.')
    feature_s = time.perf_counter() - start
    levels = self._cluster(features, epoch)
    by_k = {level['k']: level for level in levels}
    bank = bank_lib.prototype_bank([by_k[k] for k in self.schedule.active],
                                   self.config.schedule.num_levels, self.max_k)
    timing = {'estep_features_s': feature_s,
              'estep_clustering_s': sum(level['timing_s'] for level in levels),
              'estep_s': time.perf_counter() - start}
    log.info('E-step epoch %d: features %.2fs, clustering %s, total %.2fs', epoch, feature_s,
             ', '.join(f"k={l['k']} {l['timing_s']:.2f}s" for l in levels), timing['estep_s'])
    return bank, timing

  def validation_knn(self, state) -> float:
    """The over-fitting monitor: kNN top-1 (%) of the key encoder on `data.val_split`."""
    config = self.config
    variables = {'params': state.key_params, 'batch_stats': state.key_batch_stats}
    embed = functools.partial(self._embed_dataset, variables)
    val_features, val_labels = embed(self.val_dataset)
    train_features = train_labels = None
    if protocol.shares_classes(self.datasets.train_eval.source.labels, val_labels):
      train_features, train_labels = embed(self.datasets.train_eval)
    return knn.validation_knn_top1(train_features, train_labels, val_features, val_labels,
                                        k=config.eval.knn_k, temperature=config.eval.knn_t)

  def _train_batches(self, epoch: int):
    """The epoch's global batches, in the (seed, epoch) shuffle: from the host loader, or with
    `data.device_resident` gathered and drawn on the devices."""
    config = self.config
    if self.resident_images is not None:
      order = loaders.epoch_order(self.datasets.num_train, config.seed, epoch)
      return resident_lib.train_batches(self.resident_images, order, config.train.batch_size,
                                        self.steps_per_epoch, self.resident_batch,
                                        seed=config.seed, epoch=epoch)
    loader = loaders.train_loader(self.datasets.train, config.train.batch_size, seed=config.seed,
                                  epoch=epoch, num_workers=config.data.num_workers,
                                  process_index=jax.process_index(),
                                  process_count=jax.process_count())
    batch_sharding = parallel.batch_sharding(self.mesh)
    return (parallel.global_batch(batch, batch_sharding)
            for batch in loaders.numpy_batches(loader))

  def run_epoch(self, state, epoch: int, should_stop: Optional[Callable[[], bool]] = None):
    """E-step (after warm-up) then one pass of M-steps.

    Args:
      state: the state at the start of the epoch.
      epoch: the epoch number.
      should_stop: polled after every step (e.g. a SIGTERM flag); True ends the epoch early and
        the record gets 'interrupted': True.
    Returns:
      (state, record).
    Raises:
      FloatingPointError: a non-finite loss at a logging step (names epoch, step, quantity).
    """
    config = self.config
    start = time.perf_counter()
    proto_active = epoch >= config.pcl.warmup_epochs
    timing = {}
    stop_requested = should_stop is not None and should_stop()
    if proto_active and not stop_requested:
      bank, timing = self.e_step(state, epoch)
      stop_requested = should_stop is not None and should_stop()
    if stop_requested:  # before any step: the epoch's state is the input state
      return state, {'epoch': epoch, 'interrupted': True}
    if proto_active:
      smoothing = losses.smoothing_factor(self.schedule.newest_k, self.max_clusters,
                                          config.pcl.smoothing_cap)
    else:
      bank = bank_lib.empty_prototype_bank(config.schedule.num_levels, self.max_k, config.model.dim,
                                           self.datasets.num_train)
      smoothing = 0.0
    # Replicated like the step's in_shardings, so the jitted step sees one input layout always.
    bank, hparams = jax.device_put(
        (bank, step_lib.step_hparams(smoothing, config.train.epochs, self.steps_per_epoch)),
        parallel.replicated(self.mesh))
    batches = self._train_batches(epoch)
    sums, steps_done, interrupted = None, 0, False
    recent_losses = []  # device scalars since the last log: the first bad step without a sync
    step_start = time.perf_counter()
    progress = tqdm.tqdm(total=self.steps_per_epoch, desc=f'epoch {epoch}', leave=False,
                         dynamic_ncols=True)
    try:
      for step_in_epoch, batch in enumerate(batches):
        if step_in_epoch >= self.steps_per_epoch:
          break
        state, metrics = self.train_step(state, batch, bank, hparams)
        sums = metrics if sums is None else jax.tree_util.tree_map(jnp.add, sums, metrics)
        recent_losses.append(jnp.stack([metrics['loss_inst'], metrics['loss_proto']]))
        steps_done += 1
        progress.update(1)
        last = steps_done == self.steps_per_epoch
        if steps_done % config.train.log_every_steps == 0 or last:
          _check_finite_steps(jax.device_get(jnp.stack(recent_losses)), epoch,
                              steps_done - len(recent_losses))
          recent_losses = []
          shown = jax.device_get(metrics)
          progress.set_postfix(loss=f"{shown['loss']:.3f}", acc_inst=f"{shown['acc_inst']:.1f}")
        if should_stop is not None and should_stop():
          interrupted = True
          break
    finally:
      progress.close()
    means = {name: float(value) / max(steps_done, 1)
             for name, value in jax.device_get(sums).items()}
    step_time = time.perf_counter() - step_start
    epoch_time = time.perf_counter() - start
    record = {
        'epoch': epoch,
        'loss': means['loss'], 'loss_inst': means['loss_inst'], 'acc_inst': means['acc_inst'],
        'loss_proto': means['loss_proto'] if proto_active else None,
        'acc_proto': means['acc_proto'] if proto_active else None,
        'lr': means['lr'],
        'smoothing': smoothing if proto_active else None,
        'num_clusters': list(self.schedule.active) if proto_active else None,
        'epoch_time_s': epoch_time,
        'images_per_s': steps_done * config.train.batch_size / step_time,
        **timing,
        'kmeans_compilations': clustering.kmeans_compilations() - self.kmeans_compiled_before,
    }
    if interrupted:
      record['interrupted'] = True
    if (not interrupted and self.val_dataset is not None
        and (epoch + 1) % config.eval.val_every == 0):
      record['val_knn_top1'] = self.validation_knn(state)
    return state, record


def _check_finite_steps(step_losses: np.ndarray, epoch: int, first_step: int) -> None:
  """Names the first step (within the epoch) whose loss_inst or loss_proto is not finite."""
  bad_steps, bad_columns = np.nonzero(~np.isfinite(step_losses))
  if bad_steps.size:
    name = ('loss_inst', 'loss_proto')[bad_columns[0]]
    value = step_losses[bad_steps[0], bad_columns[0]]
    raise FloatingPointError(
        f'non-finite {name}={value} at epoch {epoch}, step {first_step + bad_steps[0]}; '
        'training stopped and the last checkpoint is kept. Lower optim.lr or check the data.')


def _check_finite(record: dict) -> None:
  """Raises FloatingPointError naming the epoch and quantity of a non-finite epoch mean."""
  for name in ('loss', 'loss_inst', 'loss_proto', 'acc_inst', 'acc_proto'):
    value = record.get(name)
    if value is not None and not math.isfinite(value):
      raise FloatingPointError(
          f'non-finite {name}={value} (mean over epoch {record["epoch"]}); training stopped and '
          'the last good checkpoint stays the latest. Lower optim.lr or check the data.')


@jax.jit
def _leaves_finite(leaves):
  return [jnp.all(jnp.isfinite(leaf)) for leaf in leaves]


def _check_state_finite(state, epoch: int) -> None:
  """Raises FloatingPointError if a float array of `state` holds NaN/inf, so it is never saved.

  One jitted reduction per array, fetched together: cheap next to an epoch. The loss can be
  finite while the last update already put NaN into the parameters, hence this check.
  """
  flat = [(path, leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]
          if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)]
  finite = jax.device_get(_leaves_finite([leaf for _, leaf in flat]))
  bad = [jax.tree_util.keystr(path) for (path, _), ok in zip(flat, finite) if not ok]
  if bad:
    raise FloatingPointError(
        f'non-finite values in the training state after epoch {epoch} (state{bad[0]}'
        f'{f" and {len(bad) - 1} more arrays" if len(bad) > 1 else ""}); not saved: training '
        'stopped and the last good checkpoint stays the latest. Lower optim.lr.')


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       stop_after_epochs: Optional[int] = None,
                       should_stop: Optional[Callable[[], bool]] = None,
                       schedule: Optional[cluster_schedule.ClusterSchedule] = None
                       ) -> state_lib.PCLState:
  """Trains (resuming from WORKDIR/checkpoints when present) and writes the run's files.

  A run directory that already holds `train.epochs` epochs is reported as finished and left
  untouched. SIGTERM and SIGINT stop training at the next step boundary after saving a
  checkpoint; an epoch cut short is dropped (the checkpoint holds the state at its start), so
  the resumed run gives the numbers of an uninterrupted one.

  Args:
    config: the run's configuration.
    workdir: the run directory.
    stop_after_epochs: stop early, with a checkpoint, once this many epochs are done (as a
      pre-emption would); rerunning resumes. None: run to `train.epochs`.
    should_stop: polled between steps like the signal flag (tests; schedulers); True stops the
      run as SIGTERM does.
    schedule: what `configuration.validate(config)` returned, when the caller has checked the
      config already (`main` does, before importing this module); None checks it here.
  Returns:
    The final state.
  Raises:
    UserError: a bad config, workdir or checkpoint (one-line message).
    FloatingPointError: a non-finite loss, feature or state; nothing non-finite is saved.
    TrainingInterrupted: a stop was requested; a checkpoint was saved first when needed.
  """
  if schedule is None:  # the config's one trip in: checked here, what the checks built handed on
    schedule = configuration.validate(config)
    clustering.check_settings(config)
  lock = run_files.WorkdirLock(workdir, enabled=jax.process_index() == 0)
  try:
    run_files.prepare_workdir(workdir)
    lock.acquire()
  except run_files.WorkdirError as error:
    raise UserError(str(error)) from None
  try:
    if parallel.is_main_process():
      resume.remove_partial_checkpoints(workdir)
    checkpointer = checkpoint_lib.Checkpointer(workdir, config.checkpoint.max_to_keep)
    try:
      return _train(config, schedule, workdir, checkpointer, stop_after_epochs, should_stop)
    finally:
      checkpointer.close()  # waits for the last (asynchronous) save to commit
  finally:
    lock.release()


def checkpoint_meta(trainer: Trainer, epochs_done: int) -> dict:
  """The JSON half of a checkpoint: host-side state and the settings a resume must keep."""
  config = trainer.config
  return {'epochs_done': epochs_done, 'schedule': trainer.schedule.state_dict(),
          'model': {field: config.model[field] for field in models.IDENTITY_FIELDS},
          'image_size': config.data.image_size,
          'num_negatives': config.pcl.num_negatives}


def _train(config, schedule, workdir: str, checkpointer, stop_after_epochs, should_stop):
  """`train_and_evaluate` once the workdir is locked and the checkpoint manager open."""
  # Settings that the checkpoint cannot take fail here, in seconds, before data and model.
  step = resume.resumable_step(config, workdir, checkpointer)
  trainer = Trainer(config, workdir, schedule)
  state, first_epoch = resume.restore(config, checkpointer, workdir, step,
                                      trainer.initial_state(), trainer.schedule)
  if config.train.epochs == 0 and step is None:
    # train.epochs=0 saves the initialisation as checkpoint 0: the baseline that --mode=eval
    # compares a trained run against.
    checkpointer.save(0, state, checkpoint_meta(trainer, 0))
    checkpointer.wait()
    print(f'saved the initial network as checkpoint 0 in {workdir} (train.epochs=0)', flush=True)
    return state
  if first_epoch >= config.train.epochs:
    print(f'{workdir} is finished: {first_epoch} epochs done (train.epochs='
          f'{config.train.epochs}); nothing to train. Evaluate it with --mode=eval, or raise '
          '--config.train.epochs to train further.', flush=True)
    return state
  if first_epoch:
    log.info('resumed from %s at epoch %d', checkpoint_lib.checkpoint_dir(workdir), first_epoch)
  last_epoch = config.train.epochs
  if stop_after_epochs is not None:
    last_epoch = min(last_epoch, stop_after_epochs)
  metrics_log = None  # only process 0 writes the run's files (Orbax saves from all)
  if parallel.is_main_process():
    resume.write_config(workdir, config, resumed=first_epoch > 0)
    metrics_log = run_files.MetricsLog(workdir)
  try:
    if metrics_log is not None:
      # Records past the checkpoint were written by a run killed before its next save (or a
      # torn last line): rewrite the file with the checkpoint's epochs only.
      metrics_log.truncate_from(first_epoch)
    with stop_lib.StopRequest(should_stop) as stop:
      return _run_epochs(trainer, checkpointer, metrics_log, state, first_epoch, last_epoch,
                         stop)
  finally:
    if metrics_log is not None:
      metrics_log.close()


def _run_epochs(trainer: Trainer, checkpointer, metrics_log, state, first_epoch: int,
                last_epoch: int, stop: stop_lib.StopRequest):
  """The epoch loop of `train_and_evaluate`: epochs, checks, metrics, checkpoints, stops.

  `metrics_log` is None on processes other than 0 of a multi-host run.
  """
  config = trainer.config
  saved_epoch = first_epoch  # epochs done in the newest checkpoint (0: the seeded initial state)

  def meta_for(epochs_done):
    return checkpoint_meta(trainer, epochs_done)

  def interrupted(epochs_done, detail):
    where = (f'checkpoint {epochs_done} ({epochs_done} epochs done) in '
             f'{checkpoint_lib.checkpoint_dir(trainer.workdir)}' if epochs_done else
             'no checkpoint yet (nothing to save before the first epoch ends)')
    return stop_lib.TrainingInterrupted(
        f'{stop.reason}: {detail}; resume from {where} by rerunning the same command',
        stop.signum)

  for epoch in range(first_epoch, last_epoch):
    if stop():
      if epoch != saved_epoch:
        checkpointer.save(epoch, state, meta_for(epoch))
      raise interrupted(epoch, f'stopped before epoch {epoch}')
    # The state at the start of an epoch that no checkpoint holds: saved if a stop request cuts
    # the epoch short (the train step donates the state, so keep a host copy; a collective in a
    # multi-host run, where every process takes this branch at the same epochs).
    snapshot = (jax.tree_util.tree_map(parallel.to_host, state) if epoch != saved_epoch
                else None)
    try:
      state, record = trainer.run_epoch(state, epoch, should_stop=stop)
    except FloatingPointError:
      raise
    except Exception:  # e.g. the Ctrl-C also killed the DataLoader's worker processes
      if not stop():
        raise
      record = {'interrupted': True}
    if record.get('interrupted'):
      if snapshot is not None:
        checkpointer.save(epoch, snapshot, meta_for(epoch))
      raise interrupted(epoch, f'stopped in epoch {epoch}, whose progress is dropped so that '
                        'the resumed run is exact')
    del snapshot
    _check_finite(record)
    _check_state_finite(state, epoch)
    if record['loss_proto'] is not None:
      decision = trainer.schedule.update(epoch, record)
      if decision.message:
        log.info('%s', decision.message)
    if metrics_log is not None:
      metrics_log.append(record)
      print(_epoch_summary(epoch, record), flush=True)
    epochs_done = epoch + 1
    meta = meta_for(epochs_done)
    if (epochs_done % config.checkpoint.every_epochs == 0 or epochs_done == last_epoch
        or stop()):
      checkpointer.save(epochs_done, state, meta)
      saved_epoch = epochs_done
    if 'val_knn_top1' in record:
      checkpointer.save_if_best(epochs_done, state, meta, record['val_knn_top1'])
    if stop() and epochs_done < last_epoch:
      raise interrupted(epochs_done, f'stopped after epoch {epoch}')
  # Proof that lr, smoothing and cluster-count changes never recompiled the step.
  log.info('train_step compiled %d time(s) in this run', trainer.step_compilations())
  return state
