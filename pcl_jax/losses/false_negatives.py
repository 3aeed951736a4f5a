"""Which queue keys are likely of the query's own class: the keys InfoNCE's forms act on.

This module owns the two readings of "a negative that is not one": by the E-step's clusters of
the keys' samples (`same_cluster`, for the 'masked' and 'attract' forms of `pcl.instance_loss`)
and by the keys' embeddings against the prototypes (`negative_keep_probability` and
`select_negatives`, HCSC's selection for 'selected'). Pure, jittable functions of the queue, the
batch's dataset indices and the prototype bank (`clustering.bank`); the losses themselves are in
`losses.instance`.
"""

import jax
import jax.numpy as jnp

# pcl.masked.level / pcl.attract.level: the active level with the most or the fewest prototypes,
# or (attraction only) every active level, each key weighted by the fraction that agree.
FINEST, COARSEST, GRADED = 'finest', 'coarsest', 'graded'


def _level_weights(bank, level: str):
  """[L] bool: the level slots `same_cluster` reads; none during warm-up (no active level)."""
  active = bank['active']
  if level == GRADED:
    return active
  sizes = bank['valid'].sum(-1)
  if level == FINEST:
    chosen = jnp.argmax(jnp.where(active, sizes, -1))
  else:
    chosen = jnp.argmin(jnp.where(active, sizes, jnp.iinfo(sizes.dtype).max))
  return (jnp.arange(active.shape[0]) == chosen) & active.any()


def same_cluster(index, queue_index, bank, level: str = FINEST):
  """[B, r] float in [0, 1]: how far each queue key's sample shares the query's cluster.

  'finest' / 'coarsest': 1 where it does at the active level with the most / the fewest
  prototypes (coarse clusters hold more of a class, so they catch more false negatives, and more
  true ones), else 0. 'graded': the fraction of the active levels at which it does (a key that
  shares fine clusters too is likelier of the query's class). 0 during warm-up (no active level)
  and for queue rows of no sample yet (index -1).

  Args:
    index: [B] dataset index of each query's sample.
    queue_index: [r] dataset index of each queue key's sample (-1: none yet).
    bank: the prototype bank (its 'im2cluster' [L, N], 'valid' and 'active').
    level: 'finest', 'coarsest' or 'graded' (static).
  """
  weights = _level_weights(bank, level)
  query_cluster = jnp.take(bank['im2cluster'], index, axis=-1)[:, :, None]
  key_cluster = jnp.take(bank['im2cluster'], jnp.maximum(queue_index, 0), axis=-1)[:, None, :]
  shared = (queue_index >= 0) & (query_cluster == key_cluster) & weights[:, None, None]
  return shared.sum(0) / jnp.maximum(weights.sum(), 1)


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
  `negative_keep_probability` (HCSC, Guo et al., CVPR 2022)."""
  return jax.random.bernoulli(rng, negative_keep_probability(queue, index, bank))
