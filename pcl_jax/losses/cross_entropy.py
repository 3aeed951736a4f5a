"""The cross-entropies and the top-1 accuracy that InfoNCE's forms and ProtoNCE share.

Pure, jittable array functions over logits with a validity mask: masked columns leave the
softmax, the label smoothing and the accuracy. Nothing here knows which loss it serves.
"""

import jax
import jax.numpy as jnp

# Large negative instead of -inf for masked logits: keeps softmax and its gradient finite.
MASKED = -1e9


def cross_entropy(logits, target, valid, smoothing):
  """Per-row cross-entropy with label smoothing over the valid columns only.

  Matches torch.nn.CrossEntropyLoss(label_smoothing=eps) applied to the valid columns:
  target distribution (1 - eps) * onehot + eps / n_valid.
  """
  onehot = jax.nn.one_hot(target, logits.shape[-1], dtype=logits.dtype)
  return soft_cross_entropy(logits, onehot, valid, smoothing)


def soft_cross_entropy(logits, target_probs, valid, smoothing):
  """Per-row cross-entropy against a target distribution over the columns (rows summing to 1),
  with label smoothing over the valid ones: (1 - eps) * target_probs + eps / n_valid."""
  logits = jnp.where(valid, logits, MASKED)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  num_valid = jnp.maximum(valid.sum(-1), 1)
  soft = (1.0 - smoothing) * target_probs + smoothing * valid / num_valid[..., None]
  return -jnp.sum(jnp.where(valid, soft * log_probs, 0.0), axis=-1)


def top1(logits, target):
  """Top-1 accuracy in percent of [B, C] logits against [B] target columns."""
  return 100.0 * jnp.mean(jnp.argmax(logits, axis=-1) == target)
