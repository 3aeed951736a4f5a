"""Contrastive losses: InfoNCE against the MoCo queue, ProtoNCE against cluster prototypes.

This module owns the loss formulas of DESIGN.md section 1 and nothing else: it never touches
parameters, optimizer state or the data. Every function is pure and jittable with static shapes
(the prototype count `k` enters only through the `valid` mask, so a change of k never
recompiles); accuracies are top-1 in percent.
"""

import math

import jax
import jax.numpy as jnp

# Large negative instead of -inf for masked logits: keeps softmax and its gradient finite.
_MASKED = -1e9


def smoothing_factor(num_clusters: int, max_clusters: int, cap: float = 0.2) -> float:
  """Label-smoothing epsilon for ProtoNCE: fewer clusters -> more smoothing (the notes' formula).

  eps = min(cap, sqrt((max_clusters - k) / max_clusters) * cap); host-side, not jitted.
  """
  if max_clusters <= 0:
    raise ValueError(f'pcl.max_clusters must be positive, got {max_clusters}')
  fraction = max(max_clusters - num_clusters, 0) / max_clusters
  return min(cap, math.sqrt(fraction) * cap)


def _cross_entropy(logits, target, valid, smoothing):
  """Cross-entropy with label smoothing over the valid columns only; returns per-row loss.

  Matches torch.nn.CrossEntropyLoss(label_smoothing=eps) applied to the valid columns:
  target distribution (1 - eps) * onehot + eps / n_valid.
  """
  onehot = jax.nn.one_hot(target, logits.shape[-1], dtype=logits.dtype)
  return _soft_cross_entropy(logits, onehot, valid, smoothing)


def _soft_cross_entropy(logits, target_probs, valid, smoothing):
  """Per-row cross-entropy against a target distribution over the columns (rows summing to 1),
  with label smoothing over the valid ones: (1 - eps) * target_probs + eps / n_valid."""
  logits = jnp.where(valid, logits, _MASKED)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  num_valid = jnp.maximum(valid.sum(-1), 1)
  soft = (1.0 - smoothing) * target_probs + smoothing * valid / num_valid[..., None]
  return -jnp.sum(jnp.where(valid, soft * log_probs, 0.0), axis=-1)


def attraction_target(attracted, share=0.0):
  """[B, 1 + r] InfoNCE target with extra positives: column 0 is the query's own key.

  Args:
    attracted: [B, r] bool or float weights in [0, 1]: how much each queue key is another
      positive of its query (`pcl.attract_same_cluster`; 'graded' `pcl.mask_level` gives
      fractions).
    share: the attracted keys' combined share of the target, the own key keeping 1 - share
      (`pcl.attract_share`). 0 weighs every positive by its weight, the own key by 1: uniform
      over the key and the attracted keys, false-negative attraction as published (Huynh et al.
      2022), where the own key's share falls to 1 / (n + 1) with n attracted keys.
  A row with no attracted key is the plain one-hot target.
  """
  weights = attracted.astype(jnp.float32)
  if share:
    total = weights.sum(-1, keepdims=True)
    weights = jnp.where(total > 0, share * weights / jnp.maximum(total, 1e-12), 0.0)
    own = jnp.where(total > 0, 1.0 - share, 1.0)
  else:
    own = jnp.ones((weights.shape[0], 1), jnp.float32)
  target = jnp.concatenate([own, weights], axis=1)
  return target / target.sum(-1, keepdims=True)


def _top1(logits, target):
  return 100.0 * jnp.mean(jnp.argmax(logits, axis=-1) == target)


def info_nce(q, k, queue, temperature, *, excluded=None, attracted=None, attract_share=0.0,
             smoothing=0.0, debias_prior=0.0):
  """InfoNCE of MoCo: positive q.k, negatives q.queue; target column 0.

  Args:
    q: [B, D] L2-normalised query embeddings.
    k: [B, D] L2-normalised key embeddings (no gradient flows into them).
    queue: [r, D] negative keys.
    temperature: softmax temperature T.
    excluded: optional [B, r] bool, True where a queue key is not a negative of that query
      (`pcl.mask_same_cluster_negatives`): its column is removed from the softmax and from the
      accuracy.
    attracted: optional [B, r] bool (or float weights), True where a queue key is another
      positive of that query (`pcl.attract_same_cluster`: false-negative attraction, Huynh et
      al., WACV 2022): the target is `attraction_target`'s distribution over column 0 and these
      columns, and a top-1 in any of them is correct.
    attract_share: the attracted keys' share of the target (`attraction_target`; 0: uniform).
    smoothing: label-smoothing epsilon over the remaining columns (`pcl.smooth_instance`; 0 is
      plain InfoNCE).
    debias_prior: tau+ of debiased contrastive learning (Chuang et al., NeurIPS 2020), the
      probability that a negative shares the query's class (`pcl.debias_prior`; 0 is plain
      InfoNCE). Not combined with smoothing.
  Returns:
    (loss, acc): mean cross-entropy and top-1 accuracy in percent.
  """
  q = q.astype(jnp.float32)
  l_pos = jnp.sum(q * k, axis=-1, keepdims=True)
  l_neg = q @ queue.T
  logits = jnp.concatenate([l_pos, l_neg], axis=1) / temperature
  target = jnp.zeros((q.shape[0],), jnp.int32)
  if (excluded is None and attracted is None and not debias_prior
      and isinstance(smoothing, (int, float)) and smoothing == 0):
    # PCL as published, what the step runs by default: the cheapest form (no column mask, no
    # target distribution over B x (r + 1) logits).
    return -jnp.mean(jax.nn.log_softmax(logits, axis=-1)[:, 0]), _top1(logits, target)
  valid = jnp.ones(logits.shape, bool)
  if excluded is not None:
    valid = valid.at[:, 1:].set(~excluded)
  if attracted is not None:
    target_probs = attraction_target(attracted, attract_share)
    loss = jnp.mean(_soft_cross_entropy(logits, target_probs, valid, smoothing))
    top1 = jnp.take_along_axis(target_probs, jnp.argmax(logits, axis=-1)[:, None], axis=1) > 0
    return loss, 100.0 * jnp.mean(top1)
  if debias_prior:
    loss = jnp.mean(_debiased_nce(logits, valid, temperature, debias_prior))
  else:
    loss = jnp.mean(_cross_entropy(logits, target, valid, smoothing))
  return loss, _top1(jnp.where(valid, logits, _MASKED), target)


def _debiased_nce(logits, valid, temperature, prior):
  """Per-row debiased contrastive loss (Chuang et al. 2020, eq. 7) of column-0-positive logits.

  The negatives' sum is replaced by an estimate of the true negatives' sum,
  max((sum_neg - prior * N * pos) / (1 - prior), N * e^(-1/T)), with N valid negatives. Computed
  after subtracting the largest possible logit 1/T (unit vectors), so no exp overflows.
  """
  shift = 1.0 / temperature
  pos = jnp.exp(logits[:, 0] - shift)
  neg_valid = valid[:, 1:]
  num_neg = neg_valid.sum(-1).astype(logits.dtype)
  neg_sum = jnp.sum(jnp.where(neg_valid, jnp.exp(logits[:, 1:] - shift), 0.0), axis=-1)
  estimate = (neg_sum - prior * num_neg * pos) / (1.0 - prior)
  floor = num_neg * jnp.exp(-1.0 / temperature - shift)
  negatives = jnp.maximum(estimate, floor)
  return -(logits[:, 0] - shift) + jnp.log(pos + negatives)


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
  loss = jnp.mean(_cross_entropy(logits, target, column_valid, smoothing))
  acc = _top1(jnp.where(column_valid, logits, _MASKED), target)
  return loss, acc
