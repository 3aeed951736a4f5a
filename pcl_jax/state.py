"""PCLState: everything that changes during training, as one immutable pytree.

This module owns the state's layout and the pure functions that build and evolve it (creation,
the momentum update of the key encoder, the FIFO enqueue). It never runs a loss or touches data.
The query/key networks are plain parameter fields (BYOL style); the MoCo queue and its pointer
are arrays, so nothing mutable lives outside the state and a checkpoint is the whole truth.
"""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from pcl_jax import linalg


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
  queue = linalg.l2_normalize(jax.random.normal(queue_rng, (num_negatives, dim), jnp.float32))
  return PCLState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats=batch_stats,
      key_params=jax.tree_util.tree_map(jnp.copy, params),
      key_batch_stats=jax.tree_util.tree_map(jnp.copy, batch_stats),
      opt_state=tx.init(params),
      queue=queue,
      queue_ptr=jnp.zeros((), jnp.int32),
      rng=state_rng,
  )


def momentum_update(key_params, params, momentum):
  """theta_k <- m * theta_k + (1 - m) * theta_q, leaf by leaf (pure; used inside the step)."""
  return jax.tree_util.tree_map(lambda k, q: momentum * k + (1.0 - momentum) * q,
                                key_params, params)


def enqueue(queue, queue_ptr, keys):
  """Writes `keys` [B, D] into the FIFO `queue` [r, D] at `queue_ptr`, wrapping around.

  r >= B need not be a multiple of B (the reference asserts it is; the researcher's best run uses
  r=640 at B=96): rows past the end continue at row 0, so the queue always holds the newest r
  keys. Returns (queue, new_ptr).
  """
  batch, size = keys.shape[0], queue.shape[0]
  if size % batch == 0:  # the common case: one contiguous slice, no scatter
    queue = jax.lax.dynamic_update_slice(queue, keys.astype(queue.dtype), (queue_ptr, 0))
  else:
    rows = (queue_ptr + jnp.arange(batch)) % size
    queue = queue.at[rows].set(keys.astype(queue.dtype))
  return queue, (queue_ptr + batch) % size
