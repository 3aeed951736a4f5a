"""Few-shot episodes: N-way K-shot accuracy of nearest centroid and logistic regression.

Episodes are drawn on the host (numpy, seeded: the same episodes on every backend); classes with
fewer than K + queries images are never drawn. Two classifiers on the L2-normalised features of
each episode: nearest centroid (squared Euclidean distance to the class mean of the support)
and logistic regression with sklearn's `LogisticRegression()` objective (multinomial, intercept,
L2 penalty 1/(2C)*||W||^2 with C = `FEWSHOT_LOGREG_C`; the "RFS" protocol), solved by
`FEWSHOT_LOGREG_STEPS` steps of Nesterov-accelerated gradient descent in the span of the
support. Accuracy per episode; mean over episodes and 95% interval 1.96 * std / sqrt(episodes),
in percent. The per-episode work is jitted and vmapped in batches.
"""

import functools
import math
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np

from pcl_jax.evaluation import protocol
from pcl_jax import models

# (ways, shots) of the few-shot settings; results key f'{ways}way{shots}shot'.
FEWSHOT_SETTINGS = ((5, 1), (5, 5))
FEWSHOT_LOGREG_C = 1.0  # sklearn's default inverse regularisation strength
FEWSHOT_LOGREG_STEPS = 100
FEWSHOT_EPISODE_BATCH = 500  # episodes per vmapped batch (bounds memory, not results)
_HIGHEST = jax.lax.Precision.HIGHEST


def class_table(labels) -> Tuple[np.ndarray, np.ndarray]:
  """Per class (sorted label order) its member indices, padded: (table [C, max_n], counts [C])."""
  labels = np.asarray(labels)
  _, inverse = np.unique(labels, return_inverse=True)
  counts = np.bincount(inverse)
  table = np.zeros((counts.size, counts.max()), np.int32)
  for label in range(counts.size):
    table[label, :counts[label]] = np.flatnonzero(inverse == label)
  return table, counts


def sample_episodes(rng: np.random.Generator, table, counts, *, ways: int, shots: int,
                    queries: int, episodes: int, batch: int = FEWSHOT_EPISODE_BATCH):
  """Draws episodes: `ways` distinct eligible classes, `shots + queries` distinct members each.

  Host-side numpy, vectorised over episodes (sampling without replacement as the top of uniform
  scores; ineligible classes and padding score -1): about 0.3 s for 2,000 episodes of 600-image
  classes, no compilation, and the same episodes on every backend. Memory is bounded by drawing
  `batch` episodes at a time.

  Args:
    rng: numpy Generator. table, counts: from `class_table`.
    ways, shots, queries, episodes: the episode shape and count.
  Returns:
    (support [E, ways, shots], query [E, ways, queries]) int32 dataset indices; row w of an
    episode is its class w.
  """
  table, counts = np.asarray(table), np.asarray(counts)
  eligible = counts >= shots + queries
  per_class = shots + queries
  supports, queries_out = [], []
  for first in range(0, episodes, batch):
    size = min(batch, episodes - first)
    class_scores = np.where(eligible, rng.random((size, counts.size)), -1.0)
    chosen = np.argsort(-class_scores, axis=1)[:, :ways]  # [size, ways]
    member_scores = rng.random((size, ways, table.shape[1]), dtype=np.float32)
    member_scores[np.arange(table.shape[1]) >= counts[chosen][..., None]] = -1.0
    picks = np.argpartition(-member_scores, per_class - 1, axis=2)[..., :per_class]
    # Order the picked members by their (uniform) scores: a random order, first `shots` support.
    order = np.argsort(-np.take_along_axis(member_scores, picks, axis=2), axis=2)
    members = np.take_along_axis(table[chosen], np.take_along_axis(picks, order, axis=2), axis=2)
    supports.append(members[..., :shots])
    queries_out.append(members[..., shots:])
  return (np.concatenate(supports).astype(np.int32),
          np.concatenate(queries_out).astype(np.int32))


def _logreg_episode(support_x, query_x, ways: int, inverse_c: float, steps: int):
  """sklearn-objective logistic regression of one episode, solved in the span of the support.

  Objective: sum_i CE(W x_i + b, y_i) + inverse_c / 2 * ||W||^2 (b unpenalised). With W = A^T X
  (X the support rows), the gradient step on W is the step A <- A - eta * (P - Y + inverse_c * A),
  so only Gram matrices are needed (cost n^2 instead of n*D per step). Nesterov acceleration
  with step 1/L, L = lambda_max([X, 1][X, 1]^T) / 2 + inverse_c, momentum from kappa = L / c.
  Returns the query logits [Qn, ways].
  """
  num_support = support_x.shape[0]
  targets = jax.nn.one_hot(jnp.arange(num_support) // (num_support // ways), ways)
  gram = jnp.matmul(support_x, support_x.T, precision=_HIGHEST)
  query_gram = jnp.matmul(query_x, support_x.T, precision=_HIGHEST)
  lipschitz = 0.5 * jnp.linalg.eigvalsh(gram + 1.0)[-1] + inverse_c
  ratio = jnp.sqrt(inverse_c / lipschitz)
  momentum = (1.0 - ratio) / (1.0 + ratio)
  step_size = 1.0 / lipschitz

  def gradient(coef, bias):
    residual = jax.nn.softmax(gram @ coef + bias, axis=-1) - targets
    return residual + inverse_c * coef, residual.sum(0)

  def body(_, carry):
    coef, bias, prev_coef, prev_bias = carry
    look_coef = coef + momentum * (coef - prev_coef)
    look_bias = bias + momentum * (bias - prev_bias)
    grad_coef, grad_bias = gradient(look_coef, look_bias)
    return (look_coef - step_size * grad_coef, look_bias - step_size * grad_bias, coef, bias)

  zeros = (jnp.zeros((num_support, ways)), jnp.zeros((ways,)))
  coef, bias, _, _ = jax.lax.fori_loop(0, steps, body, zeros + zeros)
  return query_gram @ coef + bias


@functools.partial(jax.jit, static_argnames=('logreg_steps', 'episode_batch'))
def _episode_accuracies(features, support, query, inverse_c, *, logreg_steps: int,
                        episode_batch: int):
  """Per-episode correct-query counts of nearest centroid and logistic regression. Jitted.

  Episodes run vmapped in batches of `episode_batch` (lax.map) to bound memory.
  """
  episodes, ways, shots = support.shape
  queries = query.shape[2]
  query_labels = jnp.repeat(jnp.arange(ways), queries)

  def one_episode(indices):
    support_index, query_index = indices
    support_x = features[support_index.reshape(-1)]  # [ways*shots, D], class-major
    query_x = features[query_index.reshape(-1)]  # [ways*queries, D]
    centroids = support_x.reshape(ways, shots, -1).mean(axis=1)
    sq_dist = (jnp.sum(query_x ** 2, -1, keepdims=True) - 2.0 * jnp.matmul(
        query_x, centroids.T, precision=_HIGHEST) + jnp.sum(centroids ** 2, -1))
    centroid_correct = jnp.sum(jnp.argmin(sq_dist, -1) == query_labels)
    logits = _logreg_episode(support_x, query_x, ways, inverse_c, logreg_steps)
    logreg_correct = jnp.sum(jnp.argmax(logits, -1) == query_labels)
    return centroid_correct, logreg_correct

  return jax.lax.map(one_episode, (support, query), batch_size=min(episode_batch, episodes))


def _mean_ci95(accuracies) -> Tuple[float, float]:
  percent = 100.0 * np.asarray(accuracies, np.float64)
  return float(percent.mean()), float(1.96 * percent.std() / math.sqrt(percent.size))


def fewshot_eval(features, labels, *, ways: int = 5, shots: int = 1, queries: int = 15,
                 episodes: int = 2000, seed: int = protocol.EVAL_SEED,
                 logreg_c: float = FEWSHOT_LOGREG_C, logreg_steps: int = FEWSHOT_LOGREG_STEPS,
                 episode_batch: int = FEWSHOT_EPISODE_BATCH) -> dict:
  """N-way K-shot accuracy of nearest centroid and logistic regression (module docstring).

  Args:
    features: [N, D] (L2-normalised here). labels: [N] ints.
    ways, shots, queries, episodes: the episode shape and count.
    seed: episodes are a function of (seed, ways, shots, queries, episodes) and the labels.
    logreg_c: C of sklearn's LogisticRegression. logreg_steps: accelerated gradient steps.
    episode_batch: episodes per vmapped batch.
  Returns:
    {'mean', 'ci95' (nearest centroid, percent), 'episodes', 'ways', 'shots', 'queries',
     'logreg': {'mean', 'ci95'}}; raises ValueError when fewer than `ways` classes have
    `shots + queries` images.
  """
  table, counts = class_table(labels)
  eligible = int(np.sum(counts >= shots + queries))
  if eligible < ways:
    raise ValueError(f'{ways}-way {shots}-shot with {queries} queries needs {ways} classes with '
                     f'at least {shots + queries} images; the split has {eligible}')
  rng = np.random.default_rng([seed, ways, shots, queries])
  support, query = sample_episodes(rng, table, counts, ways=ways, shots=shots, queries=queries,
                                   episodes=episodes)
  centroid_correct, logreg_correct = _episode_accuracies(
      models.l2_normalize(features), support, query, jnp.float32(1.0 / logreg_c),
      logreg_steps=logreg_steps, episode_batch=episode_batch)
  num_queries = ways * queries
  mean, ci95 = _mean_ci95(np.asarray(centroid_correct) / num_queries)
  logreg_mean, logreg_ci95 = _mean_ci95(np.asarray(logreg_correct) / num_queries)
  return {'mean': mean, 'ci95': ci95, 'episodes': int(episodes), 'ways': ways, 'shots': shots,
          'queries': queries, 'logreg': {'mean': logreg_mean, 'ci95': logreg_ci95}}
