"""The PCL M-step: the jitted `train_step`.

This module owns one step of training (DESIGN.md section 1, M-step): the key encoder's momentum
update and shuffle-BN keys, the loss on the query encoder, SGD, the enqueue. It is pure and
jitted once: lr, smoothing, the cluster count and the run's length enter as arrays, never as
Python constants (so runs that differ only in epochs or steps share one program), and
clustering results arrive as a padded prototype bank with static shapes. The loss, its forms
and their settings live in `losses` (`losses.pcl_loss`, `losses.LossSettings`); the state, its
optimizer and lr schedule in `state`; the prototype bank in `clustering.bank`; the loop that
calls the step in `train`.
"""

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


def step_rngs(state: state_lib.PCLState):
  """The step's two PRNG keys, (shuffle-BN's permutation, the negative-prototype sample): the
  state's key folded with its step. Public so that a peer implementation can be handed this
  step's draws (benchmarks/reference_equivalence.py)."""
  return jax.random.split(jax.random.fold_in(state.rng, state.step))


def step_hparams(smoothing: float, epochs: int, steps_per_epoch: int) -> Dict[str, jnp.ndarray]:
  """`train_step`'s `hparams`: the label smoothing (it changes between epochs) and the run's
  length, which the lr schedule reads, as arrays."""
  return {'smoothing': jnp.asarray(smoothing, jnp.float32),
          'epochs': jnp.asarray(epochs, jnp.int32),
          'steps_per_epoch': jnp.asarray(steps_per_epoch, jnp.int32)}


def train_step(state: state_lib.PCLState, batch: Dict[str, jnp.ndarray], bank: dict,
               hparams: Dict[str, jnp.ndarray], *, model, optim_config, temperature: float,
               moco_m: float, num_negatives: int, view_size: int = 0, aug_plus: bool = False,
               loss_settings: losses.LossSettings = losses.LossSettings()):
  """One PCL M-step. Pure; jit it with the keyword arguments bound (see `make_train_step`).

  Args:
    state: the training state.
    batch: 'im_q', 'im_k' [B, H, W, 3] (uint8 pixels, normalised here; or float32 already
      normalised) and 'index' [B]; or with `data.augment_on_device` 'image' [B, H, W, 3] uint8
      and the views' draws 'augment_q', 'augment_k' [B, P] (`device_augment`) instead of views.
    bank: the prototype bank (`clustering.bank`); all levels inactive during warm-up.
    hparams: `step_hparams` -- values that change between epochs or runs, as arrays.
    model: the encoder (with grouped BN); used for both query and key networks.
    optim_config: the config's `optim` section; the optimizer and its lr schedule
      (`state.make_optimizer`, `state.make_lr_schedule`) are built from it and `hparams`.
    temperature, moco_m, num_negatives: PCL constants.
    view_size, aug_plus: for batches of draws, the side of a view (`data.image_size`) and the
      recipe (`data.aug_plus`).
    loss_settings: the loss's form (`losses.LossSettings`; the defaults are PCL as published).
  Returns:
    (new_state, metrics) with scalar metrics loss, loss_inst, acc_inst, loss_proto, acc_proto, lr.
  """
  shuffle_rng, proto_rng = step_rngs(state)

  # Step 1: momentum update of the key encoder from the pre-step query encoder (reference order),
  # then the keys. They are targets: no gradient flows into the key encoder.
  key_params = state_lib.momentum_update(state.key_params, state.params, moco_m)
  keys, key_batch_stats = _shuffled_keys(
      model, {'params': key_params, 'batch_stats': state.key_batch_stats},
      _network_view(batch, 'k', view_size, aug_plus), shuffle_rng)
  keys = jax.lax.stop_gradient(keys)

  # Step 2: query embeddings; InfoNCE's form against the queue, ProtoNCE against the prototypes.
  def loss_fn(params):
    queries, new_vars = model.apply({'params': params, 'batch_stats': state.batch_stats},
                                    _network_view(batch, 'q', view_size, aug_plus),
                                    train=True, mutable=['batch_stats'])
    loss, terms = losses.pcl_loss(queries, keys, state.queue, state.queue_index,
                                  batch['index'], bank, proto_rng, hparams['smoothing'],
                                  temperature=temperature, num_negatives=num_negatives,
                                  settings=loss_settings)
    return loss, dict(terms, batch_stats=new_vars['batch_stats'])

  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  lr_schedule = state_lib.make_lr_schedule(optim_config, hparams['epochs'],
                                           hparams['steps_per_epoch'])
  tx = state_lib.make_optimizer(optim_config, lr_schedule)

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


def make_train_step(config, model, mesh=None):
  """`train_step` with the run's constants bound, jitted once with the state donated.

  Data-parallel over `mesh` (default: every device of every process): the batch is split over
  the `data` axis, the state, prototypes and metrics are replicated. Losses are means over the
  global batch and BN groups are fixed by config, so N devices compute what 1 device does.
  """
  mesh = mesh or parallel.data_mesh()
  replicated, split = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  step = functools.partial(train_step, model=model, optim_config=config.optim,
                           temperature=config.pcl.temperature, moco_m=config.pcl.moco_m,
                           num_negatives=config.pcl.num_negatives,
                           view_size=config.data.image_size, aug_plus=config.data.aug_plus,
                           loss_settings=losses.LossSettings.from_config(config.pcl))
  return jax.jit(step, donate_argnums=(0,),
                 in_shardings=(replicated, split, replicated, replicated),
                 out_shardings=(replicated, replicated))
