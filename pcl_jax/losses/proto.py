"""ProtoNCE: the query against its cluster's prototype, level by level; its label smoothing.

This module owns ProtoNCE (DESIGN.md section 1, M-step): which prototypes are a level's logit
columns (`select_prototype_columns`, or the official code's `reference_prototype_columns`,
`pcl.proto_columns`), the concentration-scaled, label-smoothed cross-entropy of one level
(`proto_nce`), its mean over the prototype bank's active levels (`mean_proto_nce`), and the
notes' smoothing epsilon (`smoothing_factor`). Pure and jittable with static shapes (the
prototype count k enters only through the `valid` mask, so a change of k never recompiles).
"""

import functools
import math

import jax
import jax.numpy as jnp

from pcl_jax.losses import cross_entropy as ce


def smoothing_factor(num_clusters: int, max_clusters: int, cap: float = 0.2) -> float:
  """Label-smoothing epsilon for ProtoNCE: fewer clusters -> more smoothing (the notes' formula).

  eps = min(cap, sqrt((max_clusters - k) / max_clusters) * cap); host-side, not jitted.
  """
  if max_clusters <= 0:
    raise ValueError(f'pcl.max_clusters must be positive, got {max_clusters}')
  fraction = max(max_clusters - num_clusters, 0) / max_clusters
  return min(cap, math.sqrt(fraction) * cap)


def select_prototype_columns(positives, valid, rng, num_negatives):
  """Chooses ProtoNCE's logit columns for one level, with static shapes.

  When the level has k <= B + r valid prototypes every one is a column. Otherwise the columns are
  the batch's distinct positive prototypes plus `num_negatives` others sampled without replacement.
  Selection is a top-k over random scores in which positives always win, so the number of columns
  is min(max_k, B + r) whatever k is.

  Args:
    positives: [B] int32 prototype index of each sample.
    valid: [max_k] bool, True for the level's real prototypes (False = padding).
    rng: PRNG key for the negative sample.
    num_negatives: r (static).
  Returns:
    (columns [C] int32 prototype indices, column_valid [C] bool).
  """
  batch = positives.shape[0]
  max_k = valid.shape[0]
  num_columns = min(max_k, batch + num_negatives)
  is_positive = jnp.zeros((max_k,), bool).at[positives].set(True)
  # Scores: positives 2, valid negatives U[0, 1), padding -1. Sorted descending, the columns are
  # the positives first, then negatives in random order, then padding.
  score = jax.random.uniform(rng, (max_k,))
  score = jnp.where(is_positive, 2.0, jnp.where(valid, score, -1.0))
  top_score, columns = jax.lax.top_k(score, num_columns)
  num_valid = valid.sum()
  num_positive = is_positive.sum()
  rank = jnp.arange(num_columns)
  keep_all = num_valid <= batch + num_negatives
  column_valid = (top_score >= 0.0) & (keep_all | (rank < num_positive + num_negatives))
  return columns.astype(jnp.int32), column_valid


def reference_prototype_columns(positives, valid, rng, num_negatives):
  """ProtoNCE's columns as the official code builds them (`pcl.proto_columns='reference'`).

  Column i is sample i's own prototype, so a prototype shared by several samples of the batch
  appears once per sample; then up to r prototypes that are no sample's positive, sampled without
  replacement (all of them when fewer than r). Sample i's target is column i. The duplicates are
  negatives equal to the positive: they cap the accuracy (a tie goes to the first column) and
  raise the loss, which is how the official code's acc_proto is measured.

  Args:
    positives: [B] int32 prototype index of each sample.
    valid: [max_k] bool, True for the level's real prototypes.
    rng: PRNG key for the negative sample.
    num_negatives: r (static).
  Returns:
    (columns [B + min(max_k, r)] int32, column_valid [same] bool, target [B] int32).
  """
  batch = positives.shape[0]
  max_k = valid.shape[0]
  is_positive = jnp.zeros((max_k,), bool).at[positives].set(True)
  score = jnp.where(valid & ~is_positive, jax.random.uniform(rng, (max_k,)), -1.0)
  top_score, negatives = jax.lax.top_k(score, min(max_k, num_negatives))
  columns = jnp.concatenate([positives, negatives.astype(jnp.int32)])
  column_valid = jnp.concatenate([jnp.ones((batch,), bool), top_score >= 0.0])
  return columns, column_valid, jnp.arange(batch, dtype=jnp.int32)


def proto_nce(q, index, im2cluster, prototypes, concentration, valid, rng, num_negatives,
              smoothing, columns='unique'):
  """ProtoNCE for one clustering level (DESIGN.md section 1, M-step).

  Args:
    q: [B, D] L2-normalised query embeddings.
    index: [B] dataset index of each sample.
    im2cluster: [N] cluster of every training sample at this level.
    prototypes: [max_k, D] L2-normalised centroids (rows past k are padding).
    concentration: [max_k] phi of each prototype (padding rows: any positive value).
    valid: [max_k] bool mask of real prototypes.
    rng: PRNG key for negative-prototype sampling.
    num_negatives: r, static.
    smoothing: label-smoothing epsilon (scalar array).
    columns: 'unique' (each prototype one column: `select_prototype_columns`) or 'reference'
      (one column per sample, as the official code: `reference_prototype_columns`); static.
  Returns:
    (loss, acc): mean smoothed cross-entropy and top-1 accuracy in percent.
  """
  # Step 1: each sample's positive prototype, and the columns of the logit matrix.
  positives = im2cluster[index].astype(jnp.int32)
  if columns == 'reference':
    selection, column_valid, target = reference_prototype_columns(positives, valid, rng,
                                                                  num_negatives)
  else:
    selection, column_valid = select_prototype_columns(positives, valid, rng, num_negatives)
    # A sample's target is the column holding its own prototype (each prototype appears once,
    # so samples sharing a prototype are never negatives).
    target = jnp.argmax(selection[None, :] == positives[:, None], axis=1)
  # Step 2: logits q.c / phi_c.
  logits = (q.astype(jnp.float32) @ prototypes[selection].T) / concentration[selection][None, :]
  # Step 3: smoothed cross-entropy over valid columns only.
  column_valid = jnp.broadcast_to(column_valid[None, :], logits.shape)
  loss = jnp.mean(ce.cross_entropy(logits, target, column_valid, smoothing))
  acc = ce.top1(jnp.where(column_valid, logits, ce.MASKED), target)
  return loss, acc


def mean_proto_nce(q, index, bank, rng, num_negatives, smoothing, columns='unique'):
  """ProtoNCE of every level slot of the prototype bank, averaged over the active ones.

  Args:
    q: [B, D] L2-normalised query embeddings.
    index: [B] dataset index of each sample.
    bank: the prototype bank (`clustering.bank.prototype_bank`); no active level gives 0.
    rng: PRNG key, split into one negative sample per level slot.
    num_negatives, smoothing, columns: as `proto_nce`.
  Returns:
    (loss, acc): the means over the active levels.
  """
  num_levels = bank['active'].shape[0]
  per_level = jax.vmap(functools.partial(proto_nce, columns=columns),
                       in_axes=(None, None, 0, 0, 0, 0, 0, None, None))
  level_loss, level_acc = per_level(q, index, bank['im2cluster'], bank['prototypes'],
                                    bank['concentration'], bank['valid'],
                                    jax.random.split(rng, num_levels), num_negatives, smoothing)
  active = bank['active']
  count = jnp.maximum(active.sum(), 1)
  loss = jnp.sum(jnp.where(active, level_loss, 0.0)) / count
  acc = jnp.sum(jnp.where(active, level_acc, 0.0)) / count
  return loss, acc
