"""InfoNCE against the MoCo queue and its forms, one pure function each (`pcl.instance_loss`).

This module owns the instance side of PCL's loss: `info_nce` (PCL as published, optionally
label-smoothed), `masked_info_nce` (some queue keys leave the negatives), `attract_info_nce`
(some become extra positives: false-negative attraction, Huynh et al., WACV 2022),
`debiased_info_nce` (Chuang et al., NeurIPS 2020) and `selected_info_nce` (HCSC's per-level
negatives, Guo et al., CVPR 2022). Each takes the query, key and queue embeddings and, where its
form needs them, which keys it acts on as arrays (`losses.false_negatives` computes those);
none reads a config. All are jittable; accuracies are top-1 in percent with target column 0
(the query's own key).
"""

import jax
import jax.numpy as jnp

from pcl_jax.losses import cross_entropy as ce


def _logits(q, k, queue, temperature):
  """[B, 1 + r] logits: the own key's q.k in column 0, then q.queue, over the temperature."""
  q = q.astype(jnp.float32)
  l_pos = jnp.sum(q * k, axis=-1, keepdims=True)
  l_neg = q @ queue.T
  return jnp.concatenate([l_pos, l_neg], axis=1) / temperature


def _own_key_loss(logits, valid, smoothing):
  """(loss, acc) of the one-hot target on column 0, over the valid columns, label-smoothed."""
  target = jnp.zeros((logits.shape[0],), jnp.int32)
  loss = jnp.mean(ce.cross_entropy(logits, target, valid, smoothing))
  return loss, ce.top1(jnp.where(valid, logits, ce.MASKED), target)


def info_nce(q, k, queue, temperature, *, smoothing=0.0):
  """InfoNCE of MoCo: positive q.k, negatives q.queue; target column 0.

  Args:
    q: [B, D] L2-normalised query embeddings.
    k: [B, D] L2-normalised key embeddings (no gradient flows into them).
    queue: [r, D] negative keys.
    temperature: softmax temperature T.
    smoothing: label-smoothing epsilon over the columns (ProtoNCE's, with
      `pcl.infonce.smoothed`); 0 is InfoNCE as published.
  Returns:
    (loss, acc): mean cross-entropy and top-1 accuracy in percent.
  """
  logits = _logits(q, k, queue, temperature)
  if isinstance(smoothing, (int, float)) and smoothing == 0:
    # PCL as published, what the step runs by default: the cheapest form (no column mask, no
    # target distribution over B x (r + 1) logits).
    target = jnp.zeros((q.shape[0],), jnp.int32)
    return -jnp.mean(jax.nn.log_softmax(logits, axis=-1)[:, 0]), ce.top1(logits, target)
  return _own_key_loss(logits, jnp.ones(logits.shape, bool), smoothing)


def masked_info_nce(q, k, queue, temperature, excluded, *, smoothing=0.0):
  """InfoNCE without the `excluded` queue keys (`pcl.instance_loss='masked'`).

  Args:
    q, k, queue, temperature, smoothing: as `info_nce`.
    excluded: [B, r] bool, True where a queue key is not a negative of that query (e.g. of the
      query's cluster: the official repository's issue #8): its column leaves the softmax, the
      smoothing and the accuracy.
  Returns:
    (loss, acc).
  """
  logits = _logits(q, k, queue, temperature)
  valid = jnp.ones(logits.shape, bool).at[:, 1:].set(~excluded)
  return _own_key_loss(logits, valid, smoothing)


def attraction_target(attracted, share=0.0):
  """[B, 1 + r] InfoNCE target with extra positives: column 0 is the query's own key.

  Args:
    attracted: [B, r] bool or float weights in [0, 1]: how much each queue key is another
      positive of its query ('graded' `pcl.attract.level` gives fractions).
    share: the attracted keys' combined share of the target, the own key keeping 1 - share
      (`pcl.attract.share`). 0 weighs every positive by its weight, the own key by 1: uniform
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


def attract_info_nce(q, k, queue, temperature, attracted, *, share=0.0, smoothing=0.0):
  """InfoNCE with the `attracted` queue keys as extra positives (`pcl.instance_loss='attract'`).

  Args:
    q, k, queue, temperature, smoothing: as `info_nce`.
    attracted: [B, r] bool or float weights: how much each queue key is another positive of its
      query; the target is `attraction_target(attracted, share)`.
    share: the attracted keys' share of the target (`attraction_target`; 0: uniform).
  Returns:
    (loss, acc): a top-1 in any positive column counts as correct.
  """
  logits = _logits(q, k, queue, temperature)
  target_probs = attraction_target(attracted, share)
  valid = jnp.ones(logits.shape, bool)
  loss = jnp.mean(ce.soft_cross_entropy(logits, target_probs, valid, smoothing))
  top1 = jnp.take_along_axis(target_probs, jnp.argmax(logits, axis=-1)[:, None], axis=1) > 0
  return loss, 100.0 * jnp.mean(top1)


def debiased_info_nce(q, k, queue, temperature, *, prior):
  """Debiased InfoNCE (Chuang et al. 2020, eq. 7; `pcl.instance_loss='debiased'`).

  The negatives' sum is replaced by an estimate of the true negatives' sum,
  max((sum_neg - prior * r * pos) / (1 - prior), r * e^(-1/T)). Computed after subtracting the
  largest possible logit 1/T (unit vectors), so no exp overflows.

  Args:
    q, k, queue, temperature: as `info_nce`.
    prior: tau+, the probability that a negative shares the query's class, in (0, 1)
      (`pcl.debiased.prior`).
  Returns:
    (loss, acc): the accuracy is InfoNCE's (the estimator changes the loss, not the ranking).
  """
  logits = _logits(q, k, queue, temperature)
  shift = 1.0 / temperature
  pos = jnp.exp(logits[:, 0] - shift)
  num_neg = jnp.float32(queue.shape[0])
  neg_sum = jnp.sum(jnp.exp(logits[:, 1:] - shift), axis=-1)
  estimate = (neg_sum - prior * num_neg * pos) / (1.0 - prior)
  floor = num_neg * jnp.exp(-1.0 / temperature - shift)
  negatives = jnp.maximum(estimate, floor)
  loss = jnp.mean(-(logits[:, 0] - shift) + jnp.log(pos + negatives))
  return loss, ce.top1(logits, jnp.zeros((q.shape[0],), jnp.int32))


def selected_info_nce(q, k, queue, temperature, selected, active, *, smoothing=0.0):
  """HCSC's instance loss (`pcl.instance_loss='selected'`): InfoNCE with each level's selected
  negatives, averaged over the active levels.

  Unselected keys leave the softmax: HCSC zeroes their logits instead, which keeps them in its
  denominator as exp(0); excluding them is what selection means. During warm-up (no active
  level) it is level slot 0's loss, plain InfoNCE when that slot keeps every key (as
  `false_negatives.select_negatives` does for inactive slots).

  Args:
    q, k, queue, temperature, smoothing: as `info_nce`.
    selected: [L, B, r] bool, the queue keys each level slot keeps as negatives of each query.
    active: [L] bool, the level slots in use.
  Returns:
    (loss, acc): means over the active levels.
  """
  per_level = jax.vmap(lambda keep: masked_info_nce(q, k, queue, temperature, ~keep,
                                                    smoothing=smoothing))
  level_loss, level_acc = per_level(selected)
  # With no level active, level slot 0 keeps every key: its loss is plain InfoNCE.
  weight = jnp.where(active.any(), active, jnp.arange(active.shape[0]) == 0).astype(jnp.float32)
  weight = weight / weight.sum()
  return jnp.sum(weight * level_loss), jnp.sum(weight * level_acc)
