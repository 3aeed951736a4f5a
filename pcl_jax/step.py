"""The PCL M-step: the jitted `train_step`.

This module owns one step of training (DESIGN.md section 1, M-step): the key encoder's momentum
update and shuffle-BN keys, InfoNCE and ProtoNCE on the query encoder, SGD, the enqueue. It is
pure and jitted once: lr, smoothing and the cluster count enter as arrays, never as Python
constants, and clustering results arrive as a padded `prototype_bank` with static shapes. Loss
formulas live in `losses`; the state, its optimizer and lr schedule in `state`; the prototype bank
in `clustering.bank`; the loop that calls the step in `train`.
"""

import dataclasses
import functools
from typing import Dict

import jax
import jax.numpy as jnp
import optax

from pcl_jax.data import device_augment
from pcl_jax.data import device_transforms
from pcl_jax import losses
from pcl_jax.run import parallel
from pcl_jax import state as state_lib


# ----------------------------------------------------------------------------------------------
# The step.


@dataclasses.dataclass(frozen=True)
class LossSwitches:
  """Optional changes to PCL's loss (config `pcl.*`); the defaults are PCL as published.

  mask_same_cluster_negatives: drop queue keys of the query's cluster from InfoNCE's negatives.
  attract_same_cluster: make those keys extra positives of InfoNCE instead (false-negative
    attraction, Huynh et al. 2022).
  mask_level: whose clusters both use: 'finest' (the active level with the most prototypes),
    'coarsest' (the fewest, the schedule's nearest guess at the classes) or, for the attraction
    only, 'graded' (each key weighted by the fraction of active levels that put it in the
    query's cluster; `same_cluster_fraction`).
  attract_share: the attracted keys' combined share of InfoNCE's target, the query's own key
    keeping the rest (0: uniform over all the positives; `losses.attraction_target`).
  proto_weight: ProtoNCE's weight against InfoNCE.
  proto_columns: 'unique' (one column per prototype) or 'reference' (the official code's columns,
    one per sample; `losses.reference_prototype_columns`).
  smooth_instance: InfoNCE smoothed with ProtoNCE's epsilon too.
  debias_prior: tau+ of debiased InfoNCE (0: off; `losses.info_nce`).
  select_negatives: HCSC's instance selection (`select_negatives`): each level keeps a random
    subset of the queue as negatives, a key the less likely the more it belongs to the query's
    prototype, and InfoNCE is averaged over the active levels.
  """
  mask_same_cluster_negatives: bool = False
  attract_same_cluster: bool = False
  mask_level: str = 'finest'
  attract_share: float = 0.0
  proto_weight: float = 1.0
  proto_columns: str = 'unique'
  smooth_instance: bool = False
  debias_prior: float = 0.0
  select_negatives: bool = False

  @classmethod
  def from_config(cls, pcl_config) -> 'LossSwitches':
    return cls(**{field.name: pcl_config.get(field.name, field.default)
                  for field in dataclasses.fields(cls)})


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


def _level_losses(q, index, bank, rng, num_negatives, smoothing, columns):
  """ProtoNCE of every level slot, averaged over the active ones."""
  num_levels = bank['active'].shape[0]
  per_level = jax.vmap(functools.partial(losses.proto_nce, columns=columns),
                       in_axes=(None, None, 0, 0, 0, 0, 0, None, None))
  level_loss, level_acc = per_level(q, index, bank['im2cluster'], bank['prototypes'],
                                    bank['concentration'], bank['valid'],
                                    jax.random.split(rng, num_levels), num_negatives, smoothing)
  active = bank['active']
  count = jnp.maximum(active.sum(), 1)
  loss = jnp.sum(jnp.where(active, level_loss, 0.0)) / count
  acc = jnp.sum(jnp.where(active, level_acc, 0.0)) / count
  return loss, acc


def _shares_cluster(im2cluster, index, queue_index):
  """[..., B, r] bool: whether each queue key's sample is in the query's cluster, by an
  im2cluster [..., N] of one level or of several; False for queue rows of no sample yet (-1)."""
  query_cluster = jnp.take(im2cluster, index, axis=-1)[..., :, None]
  key_cluster = jnp.take(im2cluster, jnp.maximum(queue_index, 0), axis=-1)[..., None, :]
  return (queue_index >= 0) & (query_cluster == key_cluster)


def same_cluster_negatives(index, queue_index, bank, level: str = 'finest'):
  """[B, r] bool: queue keys in the query's cluster at the finest (or coarsest) active level.

  `pcl.mask_same_cluster_negatives` removes them from InfoNCE's negatives (the official
  repository's issue #8): with few clusters, many queue keys are of the query's own class. The
  finest level is the active one with the most prototypes, the coarsest the one with the fewest
  (`pcl.mask_level`; coarse clusters hold more of a class, so they mask more false negatives,
  and more true ones). Nothing is masked during warm-up (no active level) or for queue rows of
  no sample yet (index -1).
  """
  sizes = bank['valid'].sum(-1)
  if level == 'finest':
    chosen = jnp.argmax(jnp.where(bank['active'], sizes, -1))
  else:
    chosen = jnp.argmin(jnp.where(bank['active'], sizes, jnp.iinfo(sizes.dtype).max))
  return _shares_cluster(bank['im2cluster'][chosen], index, queue_index) & bank['active'].any()


def same_cluster_fraction(index, queue_index, bank):
  """[B, r] float: the fraction of active levels that put each queue key in the query's cluster.

  'graded' `pcl.mask_level`: a key its query shares a cluster with at every level, fine ones
  included, is more likely of its class than one that shares only the coarsest cluster, and is
  attracted harder. Zero during warm-up (no active level) and for queue rows of no sample yet.
  """
  same = _shares_cluster(bank['im2cluster'], index, queue_index) & bank['active'][:, None, None]
  return same.sum(0) / jnp.maximum(bank['active'].sum(), 1)


def _same_cluster(index, queue_index, bank, level):
  """[B, r]: the keys the mask or the attraction acts on, by `pcl.mask_level`."""
  if level == 'graded':
    return same_cluster_fraction(index, queue_index, bank)
  return same_cluster_negatives(index, queue_index, bank, level)


def negative_keep_probability(queue, index, bank):
  """[L, B, r]: HCSC's probability that each queue key stays a negative of each query, per level.

  1 - p(key in the query's cluster), p the softmax over the level's prototypes of
  key . c / phi_c (HCSC's `sample_neg_instance`: concentration floored at 1e-3, probability
  clipped to [0, 0.999]). It reads the key's embedding, not its sample's cluster, so it needs no
  dataset index. Inactive level slots keep every key (probability 1).
  """
  def one_level(im2cluster, prototypes, concentration, valid, active):
    logits = queue @ prototypes.T / jnp.maximum(concentration, 1e-3)
    membership = jax.nn.softmax(jnp.where(valid, logits, -jnp.inf), axis=-1)  # [r, k]
    same = jnp.take(membership, jnp.take(im2cluster, index), axis=1).T  # [B, r]
    return jnp.where(active, jnp.clip(1.0 - same, 0.0, 0.999), 1.0)

  return jax.vmap(one_level)(bank['im2cluster'], bank['prototypes'], bank['concentration'],
                             bank['valid'], bank['active'])


def select_negatives(queue, index, bank, rng):
  """[L, B, r] bool: the queue keys each level keeps as negatives of each query, drawn from
  `negative_keep_probability` (`pcl.select_negatives`; HCSC, Guo et al., CVPR 2022)."""
  return jax.random.bernoulli(rng, negative_keep_probability(queue, index, bank))


def selected_info_nce(queries, keys, queue, selected, active, temperature, smoothing):
  """InfoNCE with each level's selected negatives, averaged over the active levels (HCSC's
  instance loss). Unselected keys leave the softmax: HCSC zeroes their logits instead, which
  keeps them in its denominator as exp(0); excluding them is what selection means. During
  warm-up (no active level) it is plain InfoNCE."""
  per_level = jax.vmap(lambda keep: losses.info_nce(queries, keys, queue, temperature,
                                                    excluded=~keep, smoothing=smoothing))
  level_loss, level_acc = per_level(selected)
  # With no level active, level slot 0 keeps every key: its loss is plain InfoNCE.
  weight = jnp.where(active.any(), active, jnp.arange(active.shape[0]) == 0).astype(jnp.float32)
  weight = weight / weight.sum()
  return jnp.sum(weight * level_loss), jnp.sum(weight * level_acc)


def _instance_loss(queries, keys, queue, queue_index, index, bank, rng, smoothing, temperature,
                   switches):
  """InfoNCE with the switches that change it (`LossSwitches`)."""
  smoothing = smoothing if switches.smooth_instance else 0.0
  if switches.select_negatives:
    selected = select_negatives(queue, index, bank, rng)
    return selected_info_nce(queries, keys, queue, selected, bank['active'], temperature,
                             smoothing)
  same_cluster = (_same_cluster(index, queue_index, bank, switches.mask_level)
                  if switches.mask_same_cluster_negatives or switches.attract_same_cluster
                  else None)
  return losses.info_nce(
      queries, keys, queue, temperature,
      excluded=same_cluster if switches.mask_same_cluster_negatives else None,
      attracted=same_cluster if switches.attract_same_cluster else None,
      attract_share=switches.attract_share, smoothing=smoothing,
      debias_prior=switches.debias_prior)


def pcl_loss(queries, keys, queue, queue_index, index, bank, rng, smoothing, *, temperature,
             num_negatives, switches):
  """InfoNCE + proto_weight * ProtoNCE of a batch of embeddings, with the switches applied.

  Args:
    queries, keys: [B, D] L2-normalised embeddings of the two views.
    queue, queue_index: [r, D] negative keys and [r] their samples' dataset indices.
    index: [B] dataset index of each sample.
    bank: the prototype bank (`prototype_bank`).
    rng: PRNG key of the negative-prototype sample (and of the negatives' selection).
    smoothing: ProtoNCE's label-smoothing epsilon (and InfoNCE's with `smooth_instance`).
    temperature, num_negatives: PCL constants; switches: `LossSwitches` (static).
  Returns:
    (loss, terms): terms are loss_inst, acc_inst, loss_proto, acc_proto.
  """
  # The selection's own stream: the prototype sample's key stays as it was without the switch.
  loss_inst, acc_inst = _instance_loss(queries, keys, queue, queue_index, index, bank,
                                       jax.random.fold_in(rng, 1), smoothing, temperature,
                                       switches)
  loss_proto, acc_proto = _level_losses(queries, index, bank, rng, num_negatives, smoothing,
                                        switches.proto_columns)
  terms = dict(loss_inst=loss_inst, acc_inst=acc_inst, loss_proto=loss_proto,
               acc_proto=acc_proto)
  return loss_inst + switches.proto_weight * loss_proto, terms


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
               moco_m: float, num_negatives: int, view_size: int = 0, aug_plus: bool = False,
               switches: LossSwitches = LossSwitches()):
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
    switches: the loss's optional changes (`LossSwitches`; the defaults are PCL as published).
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
    loss, terms = pcl_loss(queries, keys, state.queue, state.queue_index, batch['index'], bank,
                           proto_rng, hparams['smoothing'], temperature=temperature,
                           num_negatives=num_negatives, switches=switches)
    return loss, dict(terms, batch_stats=new_vars['batch_stats'])

  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)

  # Step 3: SGD on the query encoder; enqueue this batch's keys.
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  queue_index = state_lib.write_rows(state.queue_index, state.queue_ptr, batch['index'])
  queue, queue_ptr = state_lib.enqueue(state.queue, state.queue_ptr, keys)
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=aux['batch_stats'],
                            key_params=key_params, key_batch_stats=key_batch_stats,
                            opt_state=opt_state, queue=queue, queue_ptr=queue_ptr,
                            queue_index=queue_index)
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
                           view_size=config.data.image_size, aug_plus=config.data.aug_plus,
                           switches=LossSwitches.from_config(config.pcl))
  return jax.jit(step, donate_argnums=(0,),
                 in_shardings=(replicated, split, replicated, replicated),
                 out_shardings=(replicated, replicated))
