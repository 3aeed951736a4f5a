"""The PCL training loop: the jitted M-step, the E-step driver, logging and checkpoint cadence.

This module owns `train_step` (pure, jitted once: lr, smoothing and the cluster count enter as
arrays, never as Python constants), the feature pass, the prototype bank that carries clustering
results into the step with static shapes, and `train_and_evaluate`, which strings epochs
together. Loss formulas live in losses.py, clustering in clustering.py, the cluster-count
controller in cluster_schedule.py, file formats in run_files.py and checkpoint.py.
"""

import functools
import json
import logging
import math
import os
import shutil
import signal
import sys
import threading
import time
from typing import Callable, Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm

from pcl_jax import checkpoint as checkpoint_lib
from pcl_jax import configuration
from pcl_jax import device_augment
from pcl_jax import device_transforms
from pcl_jax import input_pipeline
from pcl_jax import losses
from pcl_jax import models
from pcl_jax import parallel
from pcl_jax import run_files
from pcl_jax import state as state_lib

# Metrics averaged over an epoch's steps; proto ones are null before the first E-step.
log = logging.getLogger(__name__)

STEP_METRICS = ('loss', 'loss_inst', 'acc_inst', 'loss_proto', 'acc_proto', 'lr')


# ----------------------------------------------------------------------------------------------
# Optimizer and learning rate.


def lr_at_epoch(optim_config, epochs: int, epoch):
  """The reference's `adjust_learning_rate` as a jnp function of a (possibly fractional) epoch."""
  lr = optim_config.lr
  if optim_config.cos:
    return lr * 0.5 * (1.0 + jnp.cos(jnp.pi * epoch / max(epochs, 1)))
  milestones = jnp.asarray(configuration.parse_int_list(optim_config.schedule, 'optim.schedule')
                           or [10**9], jnp.float32)
  return lr * 0.1 ** jnp.sum(epoch >= milestones)


def make_lr_schedule(optim_config, epochs: int, steps_per_epoch: int) -> optax.Schedule:
  """An optax schedule of the step count: constant within an epoch, or smooth per step."""
  per_epoch = optim_config.schedule_per == 'epoch'

  def schedule(step):
    epoch = step // steps_per_epoch if per_epoch else step / steps_per_epoch
    return lr_at_epoch(optim_config, epochs, jnp.asarray(epoch, jnp.float32))

  return schedule


def make_optimizer(optim_config, lr_schedule) -> optax.GradientTransformation:
  """PyTorch SGD semantics: g + wd * p, then heavy-ball momentum, then -lr."""
  return optax.chain(optax.add_decayed_weights(optim_config.weight_decay),
                     optax.sgd(lr_schedule, momentum=optim_config.momentum))


# ----------------------------------------------------------------------------------------------
# Prototype bank: clustering results with static shapes.


def empty_prototype_bank(num_levels: int, max_k: int, dim: int, num_samples: int) -> dict:
  """A bank with no active level (warm-up epochs): ProtoNCE contributes nothing."""
  return {
      'prototypes': jnp.zeros((num_levels, max_k, dim), jnp.float32),
      'concentration': jnp.ones((num_levels, max_k), jnp.float32),
      'valid': jnp.zeros((num_levels, max_k), bool),
      'im2cluster': jnp.zeros((num_levels, num_samples), jnp.int32),
      'active': jnp.zeros((num_levels,), bool),
  }


def prototype_bank(levels: Sequence[dict], num_levels: int, max_k: int) -> dict:
  """Pads per-level clustering results to `[num_levels, max_k, ...]` with validity masks.

  Args:
    levels: dicts with 'centroids' [k, D], 'im2cluster' [N], 'concentration' [k].
    num_levels: static number of level slots (schedule.num_levels).
    max_k: static prototype slots per level (the largest k the run can use).
  """
  dim = levels[0]['centroids'].shape[1]
  num_samples = levels[0]['im2cluster'].shape[0]
  bank = empty_prototype_bank(num_levels, max_k, dim, num_samples)
  for slot, level in enumerate(levels):
    k = level['centroids'].shape[0]
    if k > max_k:
      raise ValueError(f'level with k={k} exceeds the {max_k} prototype slots')
    bank['prototypes'] = bank['prototypes'].at[slot, :k].set(level['centroids'])
    bank['concentration'] = bank['concentration'].at[slot, :k].set(level['concentration'])
    bank['valid'] = bank['valid'].at[slot, :k].set(True)
    bank['im2cluster'] = bank['im2cluster'].at[slot].set(level['im2cluster'].astype(jnp.int32))
    bank['active'] = bank['active'].at[slot].set(True)
  return bank


# ----------------------------------------------------------------------------------------------
# The M-step.


def _shuffled_keys(key_model, key_variables, im_k, rng):
  """Key embeddings under emulated shuffle-BN: permute, embed (grouped BN), un-permute.

  The permutation puts each key into a BN group different from its query's, so BN statistics
  cannot leak which key is the positive (MoCo's reason for shuffling across GPUs).
  """
  permutation = jax.random.permutation(rng, im_k.shape[0])
  shuffled, new_vars = key_model.apply(key_variables, im_k[permutation], train=True,
                                       mutable=['batch_stats'])
  keys = jnp.zeros_like(shuffled).at[permutation].set(shuffled)
  return keys, new_vars['batch_stats']


def _level_losses(q, index, bank, rng, num_negatives, smoothing):
  """ProtoNCE of every level slot, averaged over the active ones."""
  num_levels = bank['active'].shape[0]
  per_level = jax.vmap(losses.proto_nce, in_axes=(None, None, 0, 0, 0, 0, 0, None, None))
  level_loss, level_acc = per_level(q, index, bank['im2cluster'], bank['prototypes'],
                                    bank['concentration'], bank['valid'],
                                    jax.random.split(rng, num_levels), num_negatives, smoothing)
  active = bank['active']
  count = jnp.maximum(active.sum(), 1)
  loss = jnp.sum(jnp.where(active, level_loss, 0.0)) / count
  acc = jnp.sum(jnp.where(active, level_acc, 0.0)) / count
  return loss, acc


def _network_view(batch: Dict[str, jnp.ndarray], name: str, view_size: int,
                  aug_plus: bool) -> jnp.ndarray:
  """View `name` ('q' or 'k') as the network takes it. With `data.augment_on_device` the batch
  holds the cached images and each view's draws ('augment_q' / 'augment_k'): augmented here."""
  if f'augment_{name}' in batch:
    if not view_size:
      raise ValueError('a batch with augmentation draws needs train_step(view_size=...)')
    return device_transforms.normalize(
        device_augment.augment(batch['image'], batch[f'augment_{name}'], view_size, aug_plus))
  return device_transforms.network_input(batch[f'im_{name}'])


def train_step(state: state_lib.PCLState, batch: Dict[str, jnp.ndarray], bank: dict,
               hparams: Dict[str, jnp.ndarray], *, model, tx, lr_schedule, temperature: float,
               moco_m: float, num_negatives: int, view_size: int = 0, aug_plus: bool = False):
  """One PCL M-step. Pure; jit it with the keyword arguments bound (see `make_train_step`).

  Args:
    state: the training state.
    batch: 'im_q', 'im_k' [B, H, W, 3] (uint8 pixels, normalised here; or float32 already
      normalised) and 'index' [B]; or with `data.augment_on_device` 'image' [B, H, W, 3] uint8
      and the views' draws 'augment_q', 'augment_k' [B, P] (`device_augment`) instead of views.
    bank: the prototype bank (see `prototype_bank`); all levels inactive during warm-up.
    hparams: {'smoothing': scalar} -- values that change between epochs, as arrays.
    model: the encoder (with grouped BN); used for both query and key networks.
    tx: the optimizer. lr_schedule: the optax schedule (for the logged lr).
    temperature, moco_m, num_negatives: PCL constants.
    view_size, aug_plus: for batches of draws, the side of a view (`data.image_size`) and the
      recipe (`data.aug_plus`).
  Returns:
    (new_state, metrics) with scalar metrics loss, loss_inst, acc_inst, loss_proto, acc_proto, lr.
  """
  rng = jax.random.fold_in(state.rng, state.step)
  shuffle_rng, proto_rng = jax.random.split(rng)

  # Step 1: momentum update of the key encoder from the pre-step query encoder (reference order),
  # then the keys. They are targets: no gradient flows into the key encoder.
  key_params = state_lib.momentum_update(state.key_params, state.params, moco_m)
  keys, key_batch_stats = _shuffled_keys(
      model, {'params': key_params, 'batch_stats': state.key_batch_stats},
      _network_view(batch, 'k', view_size, aug_plus), shuffle_rng)
  keys = jax.lax.stop_gradient(keys)

  # Step 2: query embeddings, InfoNCE against the queue and ProtoNCE against the prototypes.
  def loss_fn(params):
    queries, new_vars = model.apply({'params': params, 'batch_stats': state.batch_stats},
                                    _network_view(batch, 'q', view_size, aug_plus),
                                    train=True, mutable=['batch_stats'])
    loss_inst, acc_inst = losses.info_nce(queries, keys, state.queue, temperature)
    loss_proto, acc_proto = _level_losses(queries, batch['index'], bank, proto_rng,
                                          num_negatives, hparams['smoothing'])
    aux = dict(loss_inst=loss_inst, acc_inst=acc_inst, loss_proto=loss_proto,
               acc_proto=acc_proto, batch_stats=new_vars['batch_stats'])
    return loss_inst + loss_proto, aux

  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)

  # Step 3: SGD on the query encoder; enqueue this batch's keys.
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  queue, queue_ptr = state_lib.enqueue(state.queue, state.queue_ptr, keys)
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=aux['batch_stats'],
                            key_params=key_params, key_batch_stats=key_batch_stats,
                            opt_state=opt_state, queue=queue, queue_ptr=queue_ptr)
  metrics = dict(loss=loss, loss_inst=aux['loss_inst'], acc_inst=aux['acc_inst'],
                 loss_proto=aux['loss_proto'], acc_proto=aux['acc_proto'],
                 lr=lr_schedule(state.step))
  return new_state, metrics


def make_train_step(config, model, tx, lr_schedule, mesh=None):
  """`train_step` with the run's constants bound, jitted once with the state donated.

  Data-parallel over `mesh` (default: every device of every process): the batch is split over
  the `data` axis, the state, prototypes and metrics are replicated. Losses are means over the
  global batch and BN groups are fixed by config, so N devices compute what 1 device does.
  """
  mesh = mesh or parallel.data_mesh()
  replicated, split = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  step = functools.partial(train_step, model=model, tx=tx, lr_schedule=lr_schedule,
                           temperature=config.pcl.temperature, moco_m=config.pcl.moco_m,
                           num_negatives=config.pcl.num_negatives,
                           view_size=config.data.image_size, aug_plus=config.data.aug_plus)
  return jax.jit(step, donate_argnums=(0,),
                 in_shardings=(replicated, split, replicated, replicated),
                 out_shardings=(replicated, replicated))


# ----------------------------------------------------------------------------------------------
# Feature pass (E-step input, evaluation input).


def make_embed_fn(model, feature_layer: str = 'head', mesh=None):
  """Jitted eval-mode embedding of a batch: L2-normalised head output, or backbone features.

  Variables replicated, images and embeddings split over the mesh's `data` axis.
  """
  mesh = mesh or parallel.data_mesh()

  @functools.partial(jax.jit, in_shardings=(parallel.replicated(mesh),
                                            parallel.batch_sharding(mesh)),
                     out_shardings=parallel.batch_sharding(mesh))
  def embed(variables, images):
    embedding, backbone = model.apply(variables, images, train=False, return_backbone=True)
    if feature_layer == 'backbone':
      return models.l2_normalize(backbone)
    return embedding

  return embed


def feature_pass_batches(dataset, batch_size: int, num_workers: int, mesh,
                         transform_on_device: bool = True):
  """The network's input batches of a feature pass over an EvalDataset, in index order: global
  device arrays, batch-sharded over `mesh`, each process loading its own slice.

  With the standard eval transform (`dataset.image_size` set) and `transform_on_device`, the host
  only slices uint8 rows out of the cache and the transform runs on the device
  (`device_transforms`, equal to torchvision's); otherwise a torch loader with `num_workers`
  workers applies `dataset.transform`. The last batch is padded to full size.
  """
  sharding = parallel.batch_sharding(mesh)
  where = dict(process_index=jax.process_index(), process_count=jax.process_count())
  if transform_on_device and dataset.image_size:
    transform = device_transforms.jitted_eval_transform(dataset.image_size, mesh)
    batches = input_pipeline.eval_image_batches(dataset.source, batch_size, **where)
  else:
    transform = lambda images: images
    loader = input_pipeline.eval_loader(dataset, batch_size, num_workers=num_workers, **where)
    batches = (batch['image'] for batch in input_pipeline.numpy_batches(loader))
  for images in batches:
    yield transform(parallel.global_batch({'image': images}, sharding)['image'])


def extract_features(embed_fn, variables, dataset, batch_size: int, num_workers: int,
                     progress: bool = False, mesh=None, transform_on_device: bool = True):
  """Embeds a whole EvalDataset in index order, sharded over `mesh` (default: all devices).

  Every batch is full (the last is padded), so `embed_fn` compiles once; padding rows are
  dropped at the end. Batches come from `feature_pass_batches` (the eval transform on the device
  unless `transform_on_device` is False or the dataset has its own transform).

  Returns:
    (features [N, D] jax array on device, batch-sharded; labels [N] numpy int64).
  """
  mesh = mesh or parallel.data_mesh()
  batches = feature_pass_batches(dataset, batch_size, num_workers, mesh, transform_on_device)
  chunks = [embed_fn(variables, images) for images in tqdm.tqdm(
      batches, total=input_pipeline.num_eval_batches(len(dataset), batch_size),
      disable=not progress, desc='features', leave=False)]
  num_images = len(dataset)
  features = jnp.concatenate(chunks)[:num_images]
  return features, np.asarray(dataset.source.labels[:num_images])


# ----------------------------------------------------------------------------------------------
# The loop.


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

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    configuration.validate(config)
    self.config, self.workdir = config, workdir
    self.datasets = input_pipeline.build_train_datasets(config)
    configuration.validate_against_data(config, self.datasets.num_train)
    from pcl_jax import cluster_schedule  # pylint: disable=g-import-not-at-top
    self.schedule = cluster_schedule.ClusterSchedule.from_config(
        config.schedule, hierarchical=config.clustering.hierarchical)
    self.schedule.validate(self.datasets.num_train)
    self.max_clusters = config.pcl.max_clusters or max(self.schedule.all_clusters)
    self.max_k = min(max(self.schedule.all_clusters), self.datasets.num_train)

    batch = config.train.batch_size
    parallel.check_batch_divides(batch)
    self.mesh = parallel.data_mesh()
    full_steps = self.datasets.num_train // batch
    self.steps_per_epoch = min(full_steps, config.train.steps_per_epoch or full_steps)
    self.lr_schedule = make_lr_schedule(config.optim, config.train.epochs, self.steps_per_epoch)
    self.tx = make_optimizer(config.optim, self.lr_schedule)
    self.model = models.encoder_from_config(config, bn_groups=config.train.shuffle_bn_groups)
    self.train_step = make_train_step(config, self.model, self.tx, self.lr_schedule, self.mesh)
    self.embed = make_embed_fn(self.model, mesh=self.mesh)
    self.val_dataset = None
    if config.eval.val_every:
      self.val_dataset = input_pipeline.build_eval_dataset(config, config.data.val_split)

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
    return extract_features(self.embed, variables, dataset, self.config.train.batch_size,
                            self.config.data.num_workers, mesh=self.mesh)

  def _cluster(self, features, epoch: int):
    """Clusters every active level. faiss runs on host memory: in a multi-host run process 0
    clusters and broadcasts; the jax backend takes the (sharded) device array as it is."""
    from pcl_jax import clustering  # pylint: disable=g-import-not-at-top
    config = self.config
    run = functools.partial(
        clustering.cluster_levels, num_clusters=self.schedule.clustering_order(),
        backend=config.clustering.backend, niter=config.clustering.niter,
        nredo=config.clustering.nredo, seed=config.seed * 1000 + epoch,
        spherical=config.clustering.spherical, hierarchical=config.clustering.hierarchical,
        temperature=config.pcl.temperature, use_float16=config.clustering.use_float16,
        max_points_factor=config.clustering.max_points_factor,
        min_points_factor=config.clustering.min_points_factor)
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
    bank = prototype_bank([by_k[k] for k in self.schedule.active], self.config.schedule.num_levels,
                          self.max_k)
    timing = {'estep_features_s': feature_s,
              'estep_clustering_s': sum(level['timing_s'] for level in levels),
              'estep_s': time.perf_counter() - start}
    log.info('E-step epoch %d: features %.2fs, clustering %s, total %.2fs', epoch, feature_s,
             ', '.join(f"k={l['k']} {l['timing_s']:.2f}s" for l in levels), timing['estep_s'])
    return bank, timing

  def validation_knn(self, state) -> float:
    """The over-fitting monitor: kNN top-1 (%) of the key encoder on `data.val_split`."""
    from pcl_jax import evaluate  # pylint: disable=g-import-not-at-top
    config = self.config
    variables = {'params': state.key_params, 'batch_stats': state.key_batch_stats}
    embed = functools.partial(self._embed_dataset, variables)
    val_features, val_labels = embed(self.val_dataset)
    train_features = train_labels = None
    if evaluate.shares_classes(self.datasets.train_eval.source.labels, val_labels):
      train_features, train_labels = embed(self.datasets.train_eval)
    return evaluate.validation_knn_top1(train_features, train_labels, val_features, val_labels,
                                        k=config.eval.knn_k, temperature=config.eval.knn_t)

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
      bank = empty_prototype_bank(config.schedule.num_levels, self.max_k, config.model.dim,
                                  self.datasets.num_train)
      smoothing = 0.0
    # Replicated like the step's in_shardings, so the jitted step sees one input layout always.
    bank, hparams = jax.device_put((bank, {'smoothing': jnp.asarray(smoothing, jnp.float32)}),
                                   parallel.replicated(self.mesh))
    loader = input_pipeline.train_loader(self.datasets.train, config.train.batch_size,
                                         seed=config.seed, epoch=epoch,
                                         num_workers=config.data.num_workers,
                                         process_index=jax.process_index(),
                                         process_count=jax.process_count())
    batch_sharding = parallel.batch_sharding(self.mesh)
    sums, steps_done, interrupted = None, 0, False
    recent_losses = []  # device scalars since the last log: the first bad step without a sync
    step_start = time.perf_counter()
    progress = tqdm.tqdm(total=self.steps_per_epoch, desc=f'epoch {epoch}', leave=False,
                         dynamic_ncols=True)
    try:
      for step_in_epoch, batch in enumerate(input_pipeline.numpy_batches(loader)):
        if step_in_epoch >= self.steps_per_epoch:
          break
        state, metrics = self.train_step(state, parallel.global_batch(batch, batch_sharding),
                                         bank, hparams)
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


# ----------------------------------------------------------------------------------------------
# Run-level reliability: workdir, resume, stop requests, finiteness of what is saved.


class TrainingInterrupted(Exception):
  """Training stopped on request (SIGTERM/SIGINT or `should_stop`); rerunning resumes exactly.

  Attributes:
    signum: the signal that asked to stop, or None (a `should_stop` callable).
  """

  def __init__(self, message: str, signum: Optional[int] = None):
    super().__init__(message)
    self.signum = signum


class _StopRequest:
  """Turns SIGTERM/SIGINT into a flag that the loop polls between steps; a second signal kills.

  A callable: True once a stop was requested (by a signal or by the caller's `should_stop`).
  Handlers are installed only in the main thread and never over a signal the process was told
  to ignore (nohup); `with` restores the previous ones.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self, should_stop: Optional[Callable[[], bool]] = None):
    self.signum: Optional[int] = None
    self._should_stop = should_stop
    self._previous = {}
    self._pid = os.getpid()

  def __enter__(self) -> '_StopRequest':
    if threading.current_thread() is threading.main_thread():
      for signum in self.SIGNALS:
        if signal.getsignal(signum) is not signal.SIG_IGN:
          self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc_info) -> None:
    for signum, previous in self._previous.items():
      signal.signal(signum, signal.SIG_DFL if previous is None else previous)
    self._previous.clear()

  def _handle(self, signum, frame) -> None:
    if os.getpid() != self._pid:
      # A forked DataLoader worker inherited this handler; Ctrl-C reaches the whole process
      # group. The main process stops the loader, which ends its workers.
      return
    if self.signum is not None:
      # Asked twice: stop at once. Checkpoints on disk stay valid (Orbax commits by rename), so
      # this loses only the work since the last one.
      previous = self._previous.get(signum)
      self.__exit__()
      if callable(previous):
        previous(signum, frame)  # SIGINT: Python's default handler raises KeyboardInterrupt
      else:
        os.kill(os.getpid(), signum)
      return
    self.signum = signum
    # os.write, not logging: a signal handler may run while the logging lock is held.
    os.write(2, (f'\n{signal.Signals(signum).name} received: saving a checkpoint and stopping '
                 'at the next step (send it again to stop at once)\n').encode())

  @property
  def reason(self) -> str:
    return signal.Signals(self.signum).name if self.signum is not None else 'stop requested'

  def __call__(self) -> bool:
    return self.signum is not None or bool(self._should_stop and self._should_stop())


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


def _remove_partial_checkpoints(workdir: str) -> None:
  """Deletes `*.orbax-checkpoint-tmp*` directories left by a save that was killed.

  Orbax writes a checkpoint into such a directory and renames it when complete, so these are
  never listed as checkpoints; removing them only reclaims their disk space. Safe because the
  workdir lock guarantees that no other process is saving into this directory.
  """
  for best in (False, True):
    directory = checkpoint_lib.checkpoint_dir(workdir, best)
    if not os.path.isdir(directory):
      continue
    for name in os.listdir(directory):
      if '.orbax-checkpoint-tmp' in name:
        shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
        log.info('removed %s, the remains of an interrupted checkpoint save', name)


def _read_meta(workdir: str, step: int) -> dict:
  """The JSON `meta` item of checkpoint `step`, read alone (cheap: no arrays, no model)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = os.path.join(checkpoint_lib.checkpoint_dir(workdir), str(step), 'meta')
  return ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(path)


def _check_checkpoint_matches(config, meta: dict, path: str) -> None:
  """UserError when the checkpoint was trained with settings that its state cannot take."""
  for field, saved in sorted((meta.get('model') or {}).items()):
    if field in config.model and config.model[field] != saved:
      raise configuration.UserError(
          f'checkpoint {path} was trained with model.{field}={saved!r} but the config has '
          f'{config.model[field]!r}; resume with --config.model.{field}={saved} (the run\'s '
          'config.json has every setting) or pass a new --workdir')
  for setting, key, current in (('data.image_size', 'image_size', config.data.image_size),
                                ('pcl.num_negatives', 'num_negatives',
                                 config.pcl.num_negatives)):
    if meta.get(key) is not None and meta[key] != current:
      raise configuration.UserError(
          f'checkpoint {path} was trained with {setting}={meta[key]} but the config has '
          f'{current}; resume with --config.{setting}={meta[key]} or pass a new --workdir')
  from pcl_jax import cluster_schedule  # pylint: disable=g-import-not-at-top
  try:
    cluster_schedule.ClusterSchedule.from_config(config.schedule).load_state_dict(
        meta['schedule'])
  except ValueError as error:
    raise configuration.UserError(f'{error} ({path})') from error


def _restore_error(config, workdir: str, step: int, error: Exception) -> configuration.UserError:
  """The UserError for a checkpoint that does not restore into this config's state."""
  path = os.path.join(checkpoint_lib.checkpoint_dir(workdir), str(step))
  first_line = str(error).strip().splitlines()[0] if str(error).strip() else ''
  reason = f'{type(error).__name__}: {first_line[:160]}{"..." if len(first_line) > 160 else ""}'
  try:
    checkpoint_lib.restore_for_eval(workdir, step)  # raw: no template to mismatch
  except Exception:  # pylint: disable=broad-except
    return configuration.UserError(
        f'checkpoint {path} is damaged and cannot be restored ({reason}); delete that directory '
        'to resume from the previous checkpoint, or pass a new --workdir')
  return configuration.UserError(
      f'checkpoint {path} does not fit this config\'s training state ({reason}); resume with the '
      f'settings it was trained with ({os.path.join(workdir, "config.json")}) or pass a new '
      '--workdir')


def _ignore_closed_loop_callbacks() -> None:
  """Drops 'Event loop is closed' errors of I/O callbacks that outlive a failed Orbax restore.

  When a restore fails, Orbax closes its event loop while TensorStore reads are still pending;
  each read that completes later reports an unraisable RuntimeError with a traceback. They
  would bury the one-line error that explains the failure. Other unraisable errors pass.
  """
  previous = sys.unraisablehook
  if getattr(previous, 'ignores_closed_loop', False):
    return

  def hook(unraisable):
    if not (isinstance(unraisable.exc_value, RuntimeError)
            and 'Event loop is closed' in str(unraisable.exc_value)):
      previous(unraisable)

  hook.ignores_closed_loop = True
  sys.unraisablehook = hook


def _restore(trainer: Trainer, checkpointer, workdir: str, step: Optional[int]):
  """(state, epochs_done): checkpoint `step`'s (already checked to match), or the initial ones."""
  state = trainer.initial_state()
  if step is None:
    return state, 0
  _ignore_closed_loop_callbacks()
  try:
    state, meta = checkpointer.restore(state, step)
  except Exception as error:  # pylint: disable=broad-except
    # The abandoned reads can also report through asyncio's logger when they finish (a full
    # suite under load once printed a TensorStore spec beside the one-line error); that one
    # line, raised below, already says what failed.
    logging.getLogger('asyncio').setLevel(logging.CRITICAL)
    raise _restore_error(trainer.config, workdir, step, error) from error
  trainer.schedule.load_state_dict(meta['schedule'])
  return state, int(meta['epochs_done'])


def _config_changes(old: dict, new: dict, prefix: str = '') -> list:
  """'section.field: old -> new' for every leaf that differs between two config dicts."""
  changes = []
  for key in sorted(set(old) | set(new)):
    a, b = old.get(key), new.get(key)
    if isinstance(a, dict) and isinstance(b, dict):
      changes += _config_changes(a, b, f'{prefix}{key}.')
    elif a != b:
      changes.append(f'{prefix}{key}: {a!r} -> {b!r}')
  return changes


def _write_config(workdir: str, config, resumed: bool) -> None:
  """Writes config.json; on resume, first says which settings differ from the saved ones."""
  path = os.path.join(workdir, 'config.json')
  if resumed and os.path.exists(path):
    try:
      with open(path) as handle:
        changes = _config_changes(json.load(handle), config.to_dict())
    except (OSError, ValueError):
      changes = []
    if changes:
      log.warning('resuming with changed settings (config.json is updated): %s',
                  '; '.join(changes))
  run_files.write_json_atomic(path, config.to_dict())


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       stop_after_epochs: Optional[int] = None,
                       should_stop: Optional[Callable[[], bool]] = None) -> state_lib.PCLState:
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
  Returns:
    The final state.
  Raises:
    configuration.UserError: a bad config, workdir or checkpoint (one-line message).
    FloatingPointError: a non-finite loss, feature or state; nothing non-finite is saved.
    TrainingInterrupted: a stop was requested; a checkpoint was saved first when needed.
  """
  configuration.validate(config)
  lock = run_files.WorkdirLock(workdir, enabled=jax.process_index() == 0)
  try:
    run_files.prepare_workdir(workdir)
    lock.acquire()
  except run_files.WorkdirError as error:
    raise configuration.UserError(str(error)) from None
  try:
    if parallel.is_main_process():
      _remove_partial_checkpoints(workdir)
    checkpointer = checkpoint_lib.Checkpointer(workdir, config.checkpoint.max_to_keep)
    try:
      return _train(config, workdir, checkpointer, stop_after_epochs, should_stop)
    finally:
      checkpointer.close()  # waits for the last (asynchronous) save to commit
  finally:
    lock.release()


def checkpoint_meta(trainer: Trainer, epochs_done: int) -> dict:
  """The JSON half of a checkpoint: host-side state and the settings a resume must keep."""
  config = trainer.config
  return {'epochs_done': epochs_done, 'schedule': trainer.schedule.state_dict(),
          'model': config.model.to_dict(), 'image_size': config.data.image_size,
          'num_negatives': config.pcl.num_negatives}


def _train(config, workdir: str, checkpointer, stop_after_epochs, should_stop):
  """`train_and_evaluate` once the workdir is locked and the checkpoint manager open."""
  step = checkpointer.latest_epoch()
  if step is not None:
    # Settings that the checkpoint cannot take fail here, in seconds, before data and model.
    path = os.path.join(checkpoint_lib.checkpoint_dir(workdir), str(step))
    try:
      meta = _read_meta(workdir, step)
    except Exception as error:  # pylint: disable=broad-except
      raise configuration.UserError(
          f'checkpoint {path} is damaged: its meta cannot be read ({type(error).__name__}); '
          'delete that directory to resume from the previous checkpoint, or pass a new '
          '--workdir') from error
    _check_checkpoint_matches(config, meta, path)
  trainer = Trainer(config, workdir)
  state, first_epoch = _restore(trainer, checkpointer, workdir, step)
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
    _write_config(workdir, config, resumed=first_epoch > 0)
    metrics_log = run_files.MetricsLog(workdir)
  try:
    if metrics_log is not None:
      # Records past the checkpoint were written by a run killed before its next save (or a
      # torn last line): rewrite the file with the checkpoint's epochs only.
      metrics_log.truncate_from(first_epoch)
    with _StopRequest(should_stop) as stop:
      return _run_epochs(trainer, checkpointer, metrics_log, state, first_epoch, last_epoch,
                         stop)
  finally:
    if metrics_log is not None:
      metrics_log.close()


def _run_epochs(trainer: Trainer, checkpointer, metrics_log, state, first_epoch: int,
                last_epoch: int, stop: _StopRequest):
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
    return TrainingInterrupted(f'{stop.reason}: {detail}; resume from {where} by rerunning the '
                               'same command', stop.signum)

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
