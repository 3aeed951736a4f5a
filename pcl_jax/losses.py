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
  logits = jnp.where(valid, logits, _MASKED)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  num_valid = jnp.maximum(valid.sum(-1), 1)
  onehot = jax.nn.one_hot(target, logits.shape[-1], dtype=logits.dtype)
  soft = (1.0 - smoothing) * onehot + smoothing * valid / num_valid[..., None]
  return -jnp.sum(jnp.where(valid, soft * log_probs, 0.0), axis=-1)


def _top1(logits, target):
  return 100.0 * jnp.mean(jnp.argmax(logits, axis=-1) == target)


def info_nce(q, k, queue, temperature):
  """InfoNCE of MoCo: positive q.k, negatives q.queue; target column 0.

  Args:
    q: [B, D] L2-normalised query embeddings.
    k: [B, D] L2-normalised key embeddings (no gradient flows into them).
    queue: [r, D] negative keys.
    temperature: softmax temperature T.
  Returns:
    (loss, acc): mean cross-entropy and top-1 accuracy in percent.
  """
  q = q.astype(jnp.float32)
  l_pos = jnp.sum(q * k, axis=-1, keepdims=True)
  l_neg = q @ queue.T
  logits = jnp.concatenate([l_pos, l_neg], axis=1) / temperature
  target = jnp.zeros((q.shape[0],), jnp.int32)
  loss = -jnp.mean(jax.nn.log_softmax(logits, axis=-1)[:, 0])
  return loss, _top1(logits, target)


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


def proto_nce(q, index, im2cluster, prototypes, concentration, valid, rng, num_negatives,
              smoothing):
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
  Returns:
    (loss, acc): mean smoothed cross-entropy and top-1 accuracy in percent.
  """
  # Step 1: each sample's positive prototype, and the columns of the logit matrix.
  positives = im2cluster[index].astype(jnp.int32)
  columns, column_valid = select_prototype_columns(positives, valid, rng, num_negatives)
  # Step 2: logits q.c / phi_c; a sample's target is the column holding its own prototype
  # (each prototype appears once, so samples sharing a prototype are never negatives).
  selected = prototypes[columns]
  logits = (q.astype(jnp.float32) @ selected.T) / concentration[columns][None, :]
  target = jnp.argmax(columns[None, :] == positives[:, None], axis=1)
  # Step 3: smoothed cross-entropy over valid columns only.
  column_valid = jnp.broadcast_to(column_valid[None, :], logits.shape)
  loss = jnp.mean(_cross_entropy(logits, target, column_valid, smoothing))
  acc = _top1(jnp.where(column_valid, logits, _MASKED), target)
  return loss, acc
