"""The prototype bank: an E-step's clustering results padded to static shapes for the step.

Levels of any k sit in `[num_levels, max_k, ...]` arrays with a validity mask, so a new k never
recompiles `step.train_step`; warm-up epochs get a bank with no active level.
"""

from typing import Sequence

import jax.numpy as jnp


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
