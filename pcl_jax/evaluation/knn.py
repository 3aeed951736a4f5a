"""Weighted cosine kNN (InstDisc / solo-learn), jitted in blocks of queries; the trainer's
validation kNN.

The `eval.knn_k` most similar references vote for their class with weight
`exp(cos / eval.knn_t)`; top-1 in percent. Memory is `KNN_CHUNK x num_reference` floats.
"""

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from pcl_jax.evaluation import protocol
from pcl_jax import models

KNN_CHUNK = 512  # queries per kNN block: memory is KNN_CHUNK x num_reference floats
_HIGHEST = jax.lax.Precision.HIGHEST


@functools.partial(jax.jit, static_argnames=('k', 'num_classes', 'chunk'))
def _knn_predict(reference, reference_labels, queries, temperature, *, k: int,
                 num_classes: int, chunk: int):
  """Weighted-kNN class predictions for `queries` [Q, D], Q a multiple of `chunk`. Jitted."""

  def predict_chunk(block):
    similarity = jnp.matmul(block, reference.T, precision=_HIGHEST)  # [chunk, N]
    top_similarity, top_index = jax.lax.top_k(similarity, k)
    weights = jnp.exp(top_similarity / temperature)
    votes = jax.nn.one_hot(reference_labels[top_index], num_classes, dtype=jnp.float32)
    scores = jnp.sum(votes * weights[..., None], axis=1)  # [chunk, C]
    return jnp.argmax(scores, axis=-1)

  blocks = queries.reshape(-1, chunk, queries.shape[-1])
  return jax.lax.map(predict_chunk, blocks).reshape(-1)


def knn_predict(train_features, train_labels, query_features, *, k: int, temperature: float,
                num_classes: Optional[int] = None, chunk: int = KNN_CHUNK) -> np.ndarray:
  """Weighted cosine kNN predictions (labels in 0..num_classes-1). Jitted in blocks of queries.

  Memory is `chunk * num_reference` floats. Features are L2-normalised here (cosine similarity).
  """
  train_labels = np.asarray(train_labels)
  num_classes = int(num_classes or train_labels.max() + 1)
  reference = models.l2_normalize(train_features)
  queries = models.l2_normalize(query_features)
  num_queries = queries.shape[0]
  chunk = max(1, min(chunk, num_queries))
  padded = -(-num_queries // chunk) * chunk
  queries = jnp.pad(queries, ((0, padded - num_queries), (0, 0)))
  predictions = _knn_predict(reference, jnp.asarray(train_labels, jnp.int32), queries,
                             jnp.float32(temperature), k=min(int(k), reference.shape[0]),
                             num_classes=num_classes, chunk=chunk)
  return np.asarray(predictions[:num_queries])


def knn_top1(train_features, train_labels, query_features, query_labels, *, k: int,
             temperature: float, num_classes: Optional[int] = None,
             chunk: int = KNN_CHUNK) -> float:
  """Weighted cosine kNN top-1 in percent (InstDisc / solo-learn: votes exp(cos / T), top k).

  Args:
    train_features: [N, D] reference features (device or host array).
    train_labels: [N] ints in 0..num_classes-1.
    query_features: [Q, D]; query_labels: [Q] ints (labels absent from the reference count
      as errors).
    k: neighbours (capped at N); temperature: T of the vote weights.
    num_classes: default max(train_labels) + 1.
    chunk: queries per jitted block.
  """
  predictions = knn_predict(train_features, train_labels, query_features, k=k,
                            temperature=temperature, num_classes=num_classes, chunk=chunk)
  return float(100.0 * np.mean(predictions == np.asarray(query_labels)))


def validation_knn_top1(train_features, train_labels, val_features, val_labels, *, k: int,
                        temperature: float, chunk: int = KNN_CHUNK) -> float:
  """The trainer's over-fitting monitor: kNN top-1 (percent) on a validation split.

  Train -> val when the validation classes all occur in the train labels; otherwise (e.g.
  mini-ImageNet `val`, disjoint classes) within-val halves, and `train_features` may be None
  (check first with `protocol.shares_classes` to skip embedding the train split).
  """
  if train_features is not None and protocol.shares_classes(train_labels, val_labels):
    _, reference_labels, query_labels = protocol.dense_labels(train_labels, val_labels)
    return knn_top1(train_features, reference_labels, val_features, query_labels, k=k,
                    temperature=temperature, chunk=chunk)
  _, ref_f, ref_l, query_f, query_l = protocol.reference_and_queries(val_features, val_labels)
  _, ref_l, query_l = protocol.dense_labels(ref_l, query_l)
  return knn_top1(ref_f, ref_l, query_f, query_l, k=k, temperature=temperature, chunk=chunk)
