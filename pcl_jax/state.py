"""PCLState: everything that changes during training, as one immutable pytree.

This module owns the state's layout and the pure functions that build and evolve it (creation,
the momentum update of the key encoder, the FIFO enqueue), and the query encoder's optimizer
with its learning-rate schedule. It never runs a loss or touches data.
The query/key networks are plain parameter fields (BYOL style); the MoCo queue and its pointer
are arrays, so nothing mutable lives outside the state and a checkpoint is the whole truth.
"""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from pcl_jax import configuration
from pcl_jax import models


@flax.struct.dataclass
class PCLState:
  """Training state of PCL/MoCo (a pytree; every field is an array or a tree of arrays)."""
  step: jnp.ndarray
  params: Any
  batch_stats: Any
  key_params: Any
  key_batch_stats: Any
  opt_state: Any
  queue: jnp.ndarray  # [r, D] negative keys, L2-normalised
  queue_ptr: jnp.ndarray  # int32 scalar: next row of `queue` to overwrite
  # [r] int32: dataset index of each queue row's sample (-1: a random initial row), so negatives
  # can be told apart by cluster (pcl.instance_loss='masked' or 'attract').
  queue_index: jnp.ndarray
  rng: jnp.ndarray  # base PRNG key; per-step keys are fold_in(rng, step)


def create_state(rng, model, tx: optax.GradientTransformation, image_size: int,
                 num_negatives: int, channels: int = 3) -> PCLState:
  """Initialises both encoders (identical, as MoCo copies f_q into f_k), the optimizer, the queue.

  Args:
    rng: PRNG key.
    model: the Flax encoder.
    tx: the optax optimizer of the query encoder.
    image_size: input height = width.
    num_negatives: r, the queue length.
    channels: input channels.
  """
  init_rng, queue_rng, state_rng = jax.random.split(rng, 3)
  dummy = jnp.zeros((2, image_size, image_size, channels), jnp.float32)
  variables = model.init(init_rng, dummy, train=False)
  params, batch_stats = variables['params'], variables['batch_stats']
  dim = model.dim
  queue = models.l2_normalize(jax.random.normal(queue_rng, (num_negatives, dim), jnp.float32))
  return PCLState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats=batch_stats,
      key_params=jax.tree_util.tree_map(jnp.copy, params),
      key_batch_stats=jax.tree_util.tree_map(jnp.copy, batch_stats),
      opt_state=tx.init(params),
      queue=queue,
      queue_ptr=jnp.zeros((), jnp.int32),
      queue_index=jnp.full((num_negatives,), -1, jnp.int32),
      rng=state_rng,
  )


def momentum_update(key_params, params, momentum):
  """theta_k <- m * theta_k + (1 - m) * theta_q, leaf by leaf (pure; used inside the step)."""
  return jax.tree_util.tree_map(lambda k, q: momentum * k + (1.0 - momentum) * q,
                                key_params, params)


def write_rows(buffer, ptr, rows):
  """Writes `rows` [B, ...] into the ring `buffer` [r, ...] from row `ptr`, wrapping around.

  r >= B need not be a multiple of B (the reference asserts it is; the researcher's best run uses
  r=640 at B=96): rows past the end continue at row 0, so the buffer always holds the newest r.
  """
  batch, size = rows.shape[0], buffer.shape[0]
  rows = rows.astype(buffer.dtype)
  if size % batch == 0:  # the common case: one contiguous slice, no scatter
    start = (ptr,) + (0,) * (buffer.ndim - 1)
    return jax.lax.dynamic_update_slice(buffer, rows, start)
  return buffer.at[(ptr + jnp.arange(batch)) % size].set(rows)


def enqueue(queue, queue_ptr, keys):
  """Writes `keys` [B, D] into the FIFO `queue` [r, D] at `queue_ptr` (`write_rows`).

  Returns (queue, new_ptr).
  """
  return write_rows(queue, queue_ptr, keys), (queue_ptr + keys.shape[0]) % queue.shape[0]


# ----------------------------------------------------------------------------------------------
# The optimizer of the query encoder and its learning rate.


def lr_at_epoch(optim_config, epochs: int, epoch):
  """The reference's `adjust_learning_rate` as a jnp function of a (possibly fractional) epoch."""
  lr = optim_config.lr
  if optim_config.cos:
    return lr * 0.5 * (1.0 + jnp.cos(jnp.pi * epoch / jnp.maximum(epochs, 1)))
  milestones = jnp.asarray(configuration.parse_int_list(optim_config.schedule, 'optim.schedule')
                           or [10**9], jnp.float32)
  return lr * 0.1 ** jnp.sum(epoch >= milestones)


def make_lr_schedule(optim_config, epochs, steps_per_epoch) -> optax.Schedule:
  """An optax schedule of the step count: constant within an epoch, or smooth per step.

  `epochs` and `steps_per_epoch` are ints or int arrays: the train step takes them as arrays
  (`step.step_hparams`), so that runs which differ only in length share one compiled step."""
  per_epoch = optim_config.schedule_per == 'epoch'

  def schedule(step):
    epoch = step // steps_per_epoch if per_epoch else step / steps_per_epoch
    return lr_at_epoch(optim_config, epochs, jnp.asarray(epoch, jnp.float32))

  return schedule


def make_optimizer(optim_config, lr_schedule) -> optax.GradientTransformation:
  """PyTorch SGD semantics: g + wd * p, then heavy-ball momentum, then -lr."""
  return optax.chain(optax.add_decayed_weights(optim_config.weight_decay),
                     optax.sgd(lr_schedule, momentum=optim_config.momentum))
