"""Clustering quality of features: k-means with k = number of classes, scored against labels.

NMI (arithmetic normalisation), AMI and ARI as sklearn.metrics compute them (fractions in
[0, 1]) and the accuracy of the best one-to-one cluster-to-class matching (Hungarian, scipy, in
percent). The k-means is the project's (`pcl_jax.clustering.kmeans`, the run's backend).
"""

from typing import Callable, Dict, Optional

import numpy as np

from pcl_jax import clustering
from pcl_jax.evaluation import protocol


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


def clustering_quality(features, labels, *, backend: str = 'auto', niter: int = 20,
                       nredo: int = 5, spherical: bool = True, use_float16: bool = True,
                       seed: int = protocol.EVAL_SEED,
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
  kmeans_fn = kmeans_fn or clustering.kmeans
  _, im2cluster, _ = kmeans_fn(features, k, backend=backend, niter=niter, nredo=nredo, seed=seed,
                               spherical=spherical, use_float16=use_float16)
  return {'k': k, **clustering_metrics(labels, np.asarray(im2cluster))}
