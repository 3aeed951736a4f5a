"""Which features are references and which are queries, and the evaluation's fixed seed.

This module owns the reference/query protocol that kNN and the linear probe share (driver.py's
docstring): train -> eval when every eval class occurs in the train split, else within-eval
halves, and `EVAL_SEED`, which fixes every random choice of the evaluation (episodes, halves,
probe hold-out, k-means) so every run and checkpoint is scored on the same draws.
"""

from typing import Tuple

import jax.numpy as jnp
import numpy as np

# Fixed seed of every random choice of the evaluation (episodes, halves, probe hold-out, k-means).
EVAL_SEED = 0
PROTOCOL_TRAIN_TO_EVAL = 'train_to_eval'
PROTOCOL_EVAL_HALVES = 'eval_halves'


def dense_labels(*label_arrays):
  """Maps arbitrary integer labels to 0..C-1 jointly; returns (classes, mapped arrays...)."""
  classes = np.unique(np.concatenate([np.asarray(a).ravel() for a in label_arrays]))
  return (classes,) + tuple(np.searchsorted(classes, np.asarray(a)).astype(np.int32)
                            for a in label_arrays)



def shares_classes(train_labels, eval_labels) -> bool:
  """True when every eval class occurs in the train labels (kNN/probe can go train -> eval)."""
  return bool(np.isin(np.unique(np.asarray(eval_labels)), np.asarray(train_labels)).all())


def split_halves(labels, seed: int = EVAL_SEED) -> Tuple[np.ndarray, np.ndarray]:
  """Per class, a seeded `n // 2` reference indices and the rest as queries (sorted arrays)."""
  labels = np.asarray(labels)
  rng = np.random.default_rng(seed)
  reference, query = [], []
  for label in np.unique(labels):
    members = rng.permutation(np.flatnonzero(labels == label))
    reference.append(members[:members.size // 2])
    query.append(members[members.size // 2:])
  return np.sort(np.concatenate(reference)), np.sort(np.concatenate(query))


def reference_and_queries(eval_features, eval_labels, train_features=None, train_labels=None,
                          *, same_split: bool = False, seed: int = EVAL_SEED):
  """Chooses the kNN/probe protocol (module docstring) and returns its sets.

  Returns:
    (protocol, reference_features, reference_labels, query_features, query_labels); labels
    are numpy, features as given.
  """
  eval_labels = np.asarray(eval_labels)
  if (train_features is not None and not same_split
      and shares_classes(train_labels, eval_labels)):
    return (PROTOCOL_TRAIN_TO_EVAL, train_features, np.asarray(train_labels), eval_features,
            eval_labels)
  reference, query = split_halves(eval_labels, seed)
  eval_features = jnp.asarray(eval_features)
  return (PROTOCOL_EVAL_HALVES, eval_features[reference], eval_labels[reference],
          eval_features[query], eval_labels[query])
