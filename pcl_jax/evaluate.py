r"""Downstream evaluation of a checkpoint: kNN, linear probe, few-shot episodes, clustering quality.

This module owns `--mode=eval` (restore the key encoder from an Orbax checkpoint without building
an optimizer, embed the data under the eval transform, score the features, write
`WORKDIR/eval/results.json`) and the array metrics behind it, which the trainer reuses for its
validation kNN (`validation_knn_top1`). It never trains the encoder, never writes checkpoints and
never touches metrics.jsonl. The array work on features (kNN, the few-shot classifiers, both
logistic regressions) is jitted and batched and runs on CPU and GPU; index and label bookkeeping
runs on the host, vectorised (episode sampling in numpy, NMI/AMI/ARI via sklearn, the Hungarian
matching via scipy), as does k-means' driver (pcl_jax.clustering).

  python -m pcl_jax.main --config=configs/digits.py --workdir=/tmp/pcl_digits --mode=eval

Protocols (all randomness below uses the fixed `EVAL_SEED`, not `config.seed`, so every run and
every checkpoint is scored on the same episodes and splits):
- Features: the momentum (key) encoder in eval mode, `eval.feature_layer` (`head`: the
  L2-normalised embedding; `backbone`: the L2-normalised pooled backbone features).
- Reference/query sets of kNN and the linear probe. When every class of `data.eval_split` occurs
  in `data.train_split` (digits), the reference is the train split and the queries are the eval
  split (`protocol: "train_to_eval"`). When the eval classes are not all in the train split
  (mini-ImageNet `test`, 20 classes disjoint from `train`) or the two splits are the same, the eval
  split is cut per class into halves (`n // 2` reference, the rest queries; `"eval_halves"`) and
  the train split is never embedded.
- kNN: weighted cosine kNN (InstDisc / solo-learn): the `eval.knn_k` most similar references vote
  for their class with weight `exp(cos / eval.knn_t)`; top-1 in percent.
- Linear probe: multinomial logistic regression (optax Adam, full batch, `PROBE_STEPS` steps,
  L2 `PROBE_WEIGHT_DECAY`) on the reference features standardised with their own mean/std; the
  learning rate is picked from `PROBE_LEARNING_RATES` by top-1 on a held-out 20% of the reference
  set, and the model trained with it on the other 80% is scored on the queries.
- Few-shot: `FEWSHOT_SETTINGS` N-way K-shot episodes on the eval split, `eval.fewshot_queries`
  queries per class, `eval.fewshot_episodes` episodes, classes with fewer than K + queries images
  never drawn. Two classifiers on the L2-normalised features of each episode:
  nearest centroid (squared Euclidean distance to the class mean of the support features) and
  logistic regression with sklearn's `LogisticRegression()` objective (multinomial, intercept,
  L2 penalty 1/(2C)*||W||^2 with C = `FEWSHOT_LOGREG_C`, summed cross-entropy; the "RFS" few-shot
  protocol), solved by `FEWSHOT_LOGREG_STEPS` steps of Nesterov-accelerated gradient descent with
  step 1/L (L the Lipschitz bound of the gradient) in the span of the support features.
  Accuracy per episode over its N * queries; mean over episodes and 95% interval
  1.96 * std / sqrt(episodes) (population std), in percent.
- Clustering quality: `clustering.kmeans` (the project backend `clustering.backend`, niter, nredo,
  spherical) with k = number of classes of the eval split; NMI (arithmetic normalisation), AMI and
  ARI as sklearn.metrics compute them (fractions in [0, 1]) and the accuracy of the best
  one-to-one cluster-to-class matching (Hungarian, in percent).

results.json (DESIGN.md section 3 keys first; accuracies in percent, NMI/AMI/ARI in [0, 1];
entries that could not be computed are null with a `skipped` reason):
  {
    "knn_top1": float, "linear_top1": float,
    "fewshot": {
      "5way1shot": {"mean": float, "ci95": float, "episodes": int,   # nearest centroid
                    "ways": 5, "shots": 1, "queries": int,
                    "logreg": {"mean": float, "ci95": float}},     # logistic regression
      "5way5shot": {... same ...}},
    "clustering": {"k": int, "nmi": float, "ami": float, "ari": float, "acc": float,
                   "backend": str},
    "split": str, "checkpoint_step": int,
    "protocol": "train_to_eval" | "eval_halves",
    "knn": {"k": int, "temperature": float, "num_reference": int, "num_query": int},
    "linear_probe": {"lr": float, "holdout_top1": {lr_string: float}, "steps": int},
    "num_images": int, "feature_dim": int, "feature_layer": str,
    "timing_s": {"features": float, "knn": float, "linear_probe": float, "fewshot": float,
                 "clustering": float, "total": float}
  }
"""

import functools
import logging
import math
import os
import time
from typing import Callable, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pcl_jax import configuration

# Fixed seed of every random choice of the evaluation (episodes, halves, probe hold-out, k-means).
EVAL_SEED = 0
# (ways, shots) of the few-shot settings; results key f'{ways}way{shots}shot'.
FEWSHOT_SETTINGS = ((5, 1), (5, 5))
FEWSHOT_LOGREG_C = 1.0  # sklearn's default inverse regularisation strength
FEWSHOT_LOGREG_STEPS = 100
FEWSHOT_EPISODE_BATCH = 500  # episodes per vmapped batch (bounds memory, not results)
PROBE_LEARNING_RATES = (0.003, 0.01, 0.03, 0.1)
PROBE_STEPS = 300
PROBE_WEIGHT_DECAY = 1e-4
PROBE_HOLDOUT_FRACTION = 0.2
KNN_CHUNK = 512  # queries per kNN block: memory is KNN_CHUNK x num_reference floats
PROTOCOL_TRAIN_TO_EVAL = 'train_to_eval'
PROTOCOL_EVAL_HALVES = 'eval_halves'
# Model fields a checkpoint must share with the config to be loaded into its encoder.
MODEL_FIELDS = ('arch', 'dim', 'mlp', 'small_stem', 'width')

_HIGHEST = jax.lax.Precision.HIGHEST


def _normalize(x):
  x = jnp.asarray(x, jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _dense_labels(*label_arrays):
  """Maps arbitrary integer labels to 0..C-1 jointly; returns (classes, mapped arrays...)."""
  classes = np.unique(np.concatenate([np.asarray(a).ravel() for a in label_arrays]))
  return (classes,) + tuple(np.searchsorted(classes, np.asarray(a)).astype(np.int32)
                            for a in label_arrays)


# ----------------------------------------------------------------------------------------------
# Clustering quality.


def hungarian_accuracy(labels, assignments) -> float:
  """Top-1 in percent of the best one-to-one mapping of clusters to classes (Hungarian)."""
  from scipy import optimize  # pylint: disable=g-import-not-at-top
  labels, assignments = np.asarray(labels).ravel(), np.asarray(assignments).ravel()
  if labels.size == 0:
    raise ValueError('hungarian_accuracy of an empty labelling')
  _, label_ids = np.unique(labels, return_inverse=True)
  _, cluster_ids = np.unique(assignments, return_inverse=True)
  contingency = np.zeros((cluster_ids.max() + 1, label_ids.max() + 1), np.int64)
  np.add.at(contingency, (cluster_ids, label_ids), 1)
  rows, cols = optimize.linear_sum_assignment(contingency, maximize=True)
  return 100.0 * contingency[rows, cols].sum() / labels.size


def clustering_metrics(labels, assignments) -> Dict[str, float]:
  """NMI, AMI, ARI (sklearn.metrics, fractions) and Hungarian accuracy (percent) of a clustering."""
  from sklearn import metrics  # pylint: disable=g-import-not-at-top
  labels, assignments = np.asarray(labels).ravel(), np.asarray(assignments).ravel()
  return {
      'nmi': float(metrics.normalized_mutual_info_score(labels, assignments)),
      'ami': float(metrics.adjusted_mutual_info_score(labels, assignments)),
      'ari': float(metrics.adjusted_rand_score(labels, assignments)),
      'acc': float(hungarian_accuracy(labels, assignments)),
  }


def _project_kmeans():
  # Imported lazily: evaluation of everything else must not depend on the clustering backends.
  from pcl_jax import clustering  # pylint: disable=g-import-not-at-top
  return clustering.kmeans


def clustering_quality(features, labels, *, backend: str = 'auto', niter: int = 20,
                       nredo: int = 5, spherical: bool = True, use_float16: bool = True,
                       seed: int = EVAL_SEED,
                       kmeans_fn: Optional[Callable] = None) -> Dict[str, float]:
  """k-means with k = number of classes, scored against the labels (`clustering_metrics` + k).

  Args:
    features: [N, D] features (device or host array).
    labels: [N] integer labels.
    backend, niter, nredo, spherical, use_float16, seed: passed to `clustering.kmeans` (its
      default point-count rule applies: subsample above int(N * 5 / 3 / k) points per centroid).
    kmeans_fn: the k-means to use (default: `pcl_jax.clustering.kmeans`); tests inject fakes.
  """
  labels = np.asarray(labels)
  k = int(np.unique(labels).size)
  kmeans_fn = kmeans_fn or _project_kmeans()
  _, im2cluster, _ = kmeans_fn(features, k, backend=backend, niter=niter, nredo=nredo, seed=seed,
                               spherical=spherical, use_float16=use_float16)
  return {'k': k, **clustering_metrics(labels, np.asarray(im2cluster))}


# ----------------------------------------------------------------------------------------------
# kNN.


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
  reference = _normalize(train_features)
  queries = _normalize(query_features)
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


# ----------------------------------------------------------------------------------------------
# Reference / query protocol.


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


def validation_knn_top1(train_features, train_labels, val_features, val_labels, *, k: int,
                        temperature: float, chunk: int = KNN_CHUNK) -> float:
  """The trainer's over-fitting monitor: kNN top-1 (percent) on a validation split.

  Train -> val when the validation classes all occur in the train labels; otherwise (e.g.
  mini-ImageNet `val`, disjoint classes) within-val halves, and `train_features` may be None
  (check first with `shares_classes` to skip embedding the train split).
  """
  if train_features is not None and shares_classes(train_labels, val_labels):
    _, reference_labels, query_labels = _dense_labels(train_labels, val_labels)
    return knn_top1(train_features, reference_labels, val_features, query_labels, k=k,
                    temperature=temperature, chunk=chunk)
  _, ref_f, ref_l, query_f, query_l = reference_and_queries(val_features, val_labels)
  _, ref_l, query_l = _dense_labels(ref_l, query_l)
  return knn_top1(ref_f, ref_l, query_f, query_l, k=k, temperature=temperature, chunk=chunk)


# ----------------------------------------------------------------------------------------------
# Linear probe.


@functools.partial(jax.jit, static_argnames=('num_classes', 'steps'))
def _train_probes(fit_x, fit_y, eval_sets, learning_rates, weight_decay, *, num_classes: int,
                  steps: int):
  """Full-batch Adam logistic regressions, one per learning rate (vmapped). Jitted.

  Returns the correct-prediction count of each probe on each (x, y) of `eval_sets`:
  [len(sets), len(lrs)].
  """

  def train_one(lr):
    tx = optax.adam(lr)
    params = {'w': jnp.zeros((fit_x.shape[1], num_classes)), 'b': jnp.zeros((num_classes,))}

    def loss_fn(p):
      logits = fit_x @ p['w'] + p['b']
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, fit_y).mean()
      return ce + 0.5 * weight_decay * jnp.sum(p['w'] ** 2)

    def step(carry, _):
      p, opt_state = carry
      grads = jax.grad(loss_fn)(p)
      updates, opt_state = tx.update(grads, opt_state, p)
      return (optax.apply_updates(p, updates), opt_state), None

    (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), None, length=steps)
    return jnp.stack([jnp.sum(jnp.argmax(x @ params['w'] + params['b'], -1) == y)
                      for x, y in eval_sets])

  return jax.vmap(train_one, out_axes=1)(learning_rates)


def linear_probe(train_features, train_labels, test_features, test_labels, *,
                 learning_rates: Sequence[float] = PROBE_LEARNING_RATES,
                 steps: int = PROBE_STEPS, weight_decay: float = PROBE_WEIGHT_DECAY,
                 holdout_fraction: float = PROBE_HOLDOUT_FRACTION,
                 seed: int = EVAL_SEED) -> dict:
  """Logistic-regression probe on frozen features with a learning-rate sweep.

  The train features are standardised (their mean/std), split into fit and held-out parts
  (seeded); one probe per learning rate is trained on the fit part (full batch, jitted, vmapped
  over rates); the rate with the best held-out top-1 (the smallest on ties) gives the reported
  test top-1 of its probe.

  Returns:
    {'top1': test top-1 percent, 'lr': chosen rate, 'holdout_top1': {str(lr): percent},
     'steps': steps}.
  """
  train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)
  classes, train_y, test_y = _dense_labels(train_labels, test_labels)
  train_x = jnp.asarray(train_features, jnp.float32)
  test_x = jnp.asarray(test_features, jnp.float32)
  mean = train_x.mean(axis=0)
  std = train_x.std(axis=0) + 1e-6
  train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
  order = np.random.default_rng(seed).permutation(train_y.size)
  num_holdout = max(1, int(round(holdout_fraction * train_y.size)))
  holdout, fit = np.sort(order[:num_holdout]), np.sort(order[num_holdout:])
  rates = jnp.asarray(learning_rates, jnp.float32)
  correct = np.asarray(_train_probes(
      train_x[fit], jnp.asarray(train_y[fit]),
      ((train_x[holdout], jnp.asarray(train_y[holdout])), (test_x, jnp.asarray(test_y))),
      rates, jnp.float32(weight_decay), num_classes=int(classes.size), steps=int(steps)))
  top1 = 100.0 * correct / np.array([[holdout.size], [test_y.size]], np.float64)
  best = int(np.argmax(top1[0]))
  return {'top1': float(top1[1, best]), 'lr': float(learning_rates[best]),
          'holdout_top1': {f'{lr:g}': float(acc) for lr, acc in zip(learning_rates, top1[0])},
          'steps': int(steps)}


# ----------------------------------------------------------------------------------------------
# Few-shot episodes.


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
                 episodes: int = 2000, seed: int = EVAL_SEED,
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
      _normalize(features), support, query, jnp.float32(1.0 / logreg_c),
      logreg_steps=logreg_steps, episode_batch=episode_batch)
  num_queries = ways * queries
  mean, ci95 = _mean_ci95(np.asarray(centroid_correct) / num_queries)
  logreg_mean, logreg_ci95 = _mean_ci95(np.asarray(logreg_correct) / num_queries)
  return {'mean': mean, 'ci95': ci95, 'episodes': int(episodes), 'ways': ways, 'shots': shots,
          'queries': queries, 'logreg': {'mean': logreg_mean, 'ci95': logreg_ci95}}


# ----------------------------------------------------------------------------------------------
# All metrics of one set of features.


def _timed(timing: dict, name: str, fn, *args, **kwargs):
  start = time.perf_counter()
  result = fn(*args, **kwargs)
  jax.block_until_ready(result)
  timing[name] = time.perf_counter() - start
  return result


def evaluate_features(config, eval_features, eval_labels, train_features=None,
                      train_labels=None, *, same_split: bool = False,
                      kmeans_fn: Optional[Callable] = None) -> dict:
  """Every metric of results.json from features (no checkpoint, no files).

  Args:
    config: the run config (sections `eval` and `clustering` are read).
    eval_features: [N, D] features of the eval split; eval_labels: [N].
    train_features, train_labels: the train split, or None (then within-eval halves).
    same_split: the two splits are the same images (forces within-eval halves).
    kmeans_fn: k-means override (default `pcl_jax.clustering.kmeans`).
  Returns:
    The results dict of the module docstring without `split` and `checkpoint_step`.
  """
  timing = {}
  start = time.perf_counter()
  eval_labels = np.asarray(eval_labels)
  eval_features = jnp.asarray(eval_features, jnp.float32)
  protocol, ref_f, ref_l, query_f, query_l = reference_and_queries(
      eval_features, eval_labels, train_features, train_labels, same_split=same_split)
  _, ref_y, query_y = _dense_labels(ref_l, query_l)
  results = {'protocol': protocol, 'num_images': int(eval_labels.size),
             'feature_dim': int(eval_features.shape[1])}

  results['knn_top1'] = _timed(timing, 'knn', knn_top1, ref_f, ref_y, query_f, query_y,
                               k=config.eval.knn_k, temperature=config.eval.knn_t)
  results['knn'] = {'k': int(config.eval.knn_k), 'temperature': float(config.eval.knn_t),
                    'num_reference': int(ref_y.size), 'num_query': int(query_y.size)}

  probe = _timed(timing, 'linear_probe', linear_probe, ref_f, ref_y, query_f, query_y)
  results['linear_top1'] = probe.pop('top1')
  results['linear_probe'] = probe

  def all_fewshot():
    fewshot = {}
    for ways, shots in FEWSHOT_SETTINGS:
      name = f'{ways}way{shots}shot'
      try:
        fewshot[name] = fewshot_eval(eval_features, eval_labels, ways=ways, shots=shots,
                                     queries=config.eval.fewshot_queries,
                                     episodes=config.eval.fewshot_episodes)
      except ValueError as error:
        logging.warning('few-shot %s skipped: %s', name, error)
        fewshot[name] = {'mean': None, 'ci95': None, 'episodes': 0, 'ways': ways,
                         'shots': shots, 'queries': config.eval.fewshot_queries,
                         'logreg': {'mean': None, 'ci95': None}, 'skipped': str(error)}
    return fewshot

  results['fewshot'] = _timed(timing, 'fewshot', all_fewshot)
  results['clustering'] = _timed(
      timing, 'clustering', clustering_quality, eval_features, eval_labels,
      backend=config.clustering.backend, niter=config.clustering.niter,
      nredo=config.clustering.nredo, spherical=config.clustering.spherical,
      use_float16=config.clustering.use_float16, kmeans_fn=kmeans_fn)
  results['clustering']['backend'] = config.clustering.backend
  timing['total'] = time.perf_counter() - start
  results['timing_s'] = timing
  return results


# ----------------------------------------------------------------------------------------------
# From a checkpoint.


def check_model_matches(config, meta: dict, checkpoint_path: str) -> None:
  """Raises UserError naming the first `model.*` field where the config and checkpoint differ."""
  saved = meta.get('model') or {}
  for field in MODEL_FIELDS:
    if field in saved and field in config.model and saved[field] != config.model[field]:
      raise configuration.UserError(
          f'config model.{field}={config.model[field]!r} does not match the checkpoint '
          f'{checkpoint_path} (trained with model.{field}={saved[field]!r}); pass '
          f'--config.model.{field}={saved[field]} or the config the run was trained with')


def _fmt(value, digits: int = 2, suffix: str = '') -> str:
  return 'n/a' if value is None else f'{value:.{digits}f}{suffix}'


def format_table(results: dict) -> str:
  """A readable summary of a results dict (printed by `evaluate_checkpoint`)."""
  knn, probe, clusters = results['knn'], results['linear_probe'], results['clustering']
  rows = [
      (f"kNN top-1 (k={knn['k']}, T={knn['temperature']:g})", _fmt(results['knn_top1'],
                                                                    suffix=' %')),
      (f"linear probe top-1 (lr={probe['lr']:g})", _fmt(results['linear_top1'], suffix=' %')),
  ]
  for name, entry in results['fewshot'].items():
    setting = f"{entry['ways']}-way {entry['shots']}-shot"
    if entry['mean'] is None:
      rows.append((setting, f"skipped: {entry.get('skipped', '')}"))
      continue
    rows.append((f'{setting} nearest centroid', f"{entry['mean']:.2f} +- {entry['ci95']:.2f} %"))
    rows.append((f'{setting} logistic regression',
                 f"{entry['logreg']['mean']:.2f} +- {entry['logreg']['ci95']:.2f} %"))
  rows += [(f"k-means k={clusters['k']} NMI / AMI / ARI",
            f"{clusters['nmi']:.3f} / {clusters['ami']:.3f} / {clusters['ari']:.3f}"),
           (f"k-means k={clusters['k']} Hungarian acc", _fmt(clusters['acc'], suffix=' %'))]
  header = (f"eval of checkpoint {results.get('checkpoint_step')} on split "
            f"{results.get('split')!r}: {results['num_images']} images, D={results['feature_dim']}"
            f", kNN/probe {results['protocol']} ({knn['num_reference']} reference, "
            f"{knn['num_query']} queries)")
  width = max(len(name) for name, _ in rows)
  lines = [header, '-' * len(header)] + [f'{name:<{width}}  {value}' for name, value in rows]
  timing = results.get('timing_s', {})
  if timing:
    lines.append('time: ' + ', '.join(f'{name} {seconds:.1f}s' for name, seconds in
                                      timing.items()))
  return '\n'.join(lines)


def results_path(workdir: str) -> str:
  return os.path.join(workdir, 'eval', 'results.json')


def evaluate_variables(config, variables, *, kmeans_fn: Optional[Callable] = None):
  """Embeds the eval (and, for shared classes, train) split with `variables` and scores them.

  Args:
    config: the run config (data, model, eval, clustering sections).
    variables: {'params', 'batch_stats'} of the encoder (the key encoder of a checkpoint, or a
      fresh initialisation for a baseline).
    kmeans_fn: k-means override (default `pcl_jax.clustering.kmeans`).
  Returns:
    (results without `checkpoint_step`, eval features [N, D] device array, eval labels [N]).
  """
  # Imported here: train pulls in the data pipeline, which the metric functions do not need.
  from pcl_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  from pcl_jax import models  # pylint: disable=g-import-not-at-top
  from pcl_jax import train  # pylint: disable=g-import-not-at-top

  start = time.perf_counter()
  model = models.encoder_from_config(config)
  embed_fn = train.make_embed_fn(model, config.eval.feature_layer)
  batch_size, workers = config.train.batch_size, config.data.num_workers
  split = config.data.eval_split
  eval_dataset = input_pipeline.build_eval_dataset(config, split)
  eval_features, eval_labels = train.extract_features(embed_fn, variables, eval_dataset,
                                                      batch_size, workers)
  # Embed the train split only when kNN / the probe go train -> eval (shared classes).
  same_split = config.data.train_split == split
  train_features = train_labels = None
  if not same_split:
    train_dataset = input_pipeline.build_eval_dataset(config, config.data.train_split)
    source_labels = getattr(getattr(train_dataset, 'source', None), 'labels', None)
    if source_labels is None or shares_classes(source_labels, eval_labels):
      train_features, train_labels = train.extract_features(embed_fn, variables, train_dataset,
                                                            batch_size, workers)
  jax.block_until_ready((eval_features, train_features))
  feature_s = time.perf_counter() - start

  results = evaluate_features(config, eval_features, eval_labels, train_features, train_labels,
                              same_split=same_split, kmeans_fn=kmeans_fn)
  results['timing_s'] = {'features': feature_s, **results['timing_s']}
  results['timing_s']['total'] += feature_s
  results.update(split=split, feature_layer=config.eval.feature_layer)
  return results, eval_features, eval_labels


def evaluate_checkpoint(config, workdir: str, epochs_done: Optional[int] = None, *,
                        overwrite: bool = False, best: bool = False,
                        kmeans_fn: Optional[Callable] = None) -> dict:
  """`--mode=eval`: restores a checkpoint's key encoder, scores it, writes WORKDIR/eval/.

  No optimizer or training state is built: the raw saved tree is restored and only
  `key_params` / `key_batch_stats` are used.

  Args:
    config: the run config; its `model` must match the checkpoint's.
    workdir: the run directory (WORKDIR/checkpoints is read).
    epochs_done: the checkpoint (epochs done) to evaluate; default the latest.
    overwrite: replace an existing WORKDIR/eval/results.json (otherwise UserError).
    best: evaluate the best-by-validation checkpoint (WORKDIR/checkpoints_best).
    kmeans_fn: k-means override (default `pcl_jax.clustering.kmeans`).
  Returns:
    The results dict written to results.json (also printed as a table).
  Raises:
    FileNotFoundError: no (such) checkpoint. configuration.UserError: config/checkpoint mismatch,
    or results.json exists and overwrite is False.
  """
  from pcl_jax import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  from pcl_jax import run_files  # pylint: disable=g-import-not-at-top

  configuration.validate(config)
  output = results_path(workdir)
  if os.path.exists(output) and not overwrite:
    raise configuration.UserError(f'{output} exists; pass --overwrite to replace it')
  tree, meta, step = checkpoint_lib.restore_for_eval(workdir, epochs_done, best=best)
  checkpoint_path = os.path.join(checkpoint_lib.checkpoint_dir(workdir, best), str(step))
  check_model_matches(config, meta, checkpoint_path)
  if meta.get('image_size') not in (None, config.data.image_size):
    logging.warning('evaluating at data.image_size=%s but the checkpoint was trained at %s',
                    config.data.image_size, meta['image_size'])

  variables = {'params': tree['key_params'], 'batch_stats': tree['key_batch_stats']}
  results, eval_features, eval_labels = evaluate_variables(config, variables,
                                                           kmeans_fn=kmeans_fn)
  results['checkpoint_step'] = int(step)
  if config.eval.save_features:
    arrays = dict(features=np.asarray(eval_features), labels=np.asarray(eval_labels))
    run_files.write_atomic(os.path.join(workdir, 'eval', f'features_{results["split"]}.npz'),
                           lambda tmp: np.savez(tmp, **arrays), binary=True)
  run_files.write_json_atomic(output, results)
  print(format_table(results), flush=True)
  return results
