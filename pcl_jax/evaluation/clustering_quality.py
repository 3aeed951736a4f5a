"""Clustering quality of features: k-means with k = number of classes, scored against labels.

NMI (arithmetic normalisation), AMI and ARI as sklearn.metrics compute them (fractions in
[0, 1]) and the accuracy of the best one-to-one cluster-to-class matching (Hungarian, scipy, in
percent). The k-means is the project's (`pcl_jax.clustering.kmeans`, the run's backend) with
the evaluation's own fixed settings, not the run's `clustering.*`, averaged over several seeds.
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


# The evaluation's k-means, fixed so that every run is scored alike whatever its own
# clustering.* (the E-step's settings): Lloyd iterations, and restarts of which each run keeps
# the lowest objective.
KMEANS_NITER = 20
KMEANS_NREDO = 5


def clustering_quality(features, labels, *, runs: int = 1, spherical: bool = False,
                       backend: str = 'auto', use_float16: bool = True,
                       seed: int = protocol.EVAL_SEED,
                       kmeans_fn: Optional[Callable] = None, return_assignments: bool = False):
  """k-means with k = number of classes, scored against the labels, averaged over `runs` runs.

  One k-means run's NMI on a few hundred images moves by about 0.01 with its seed alone (the
  local minimum it lands in), as much as the differences between training recipes. The metrics
  are therefore the mean over `runs` runs (seeds `seed`, `seed` + 1, ...), with the NMI's
  standard deviation over the runs and each run's NMI beside them.

  Args:
    features: [N, D] features (device or host array).
    labels: [N] integer labels.
    runs: k-means runs to average (>= 1).
    spherical: spherical k-means (unit-norm centroids) instead of L2.
    backend, use_float16: passed to `clustering.kmeans` with `KMEANS_NITER`, `KMEANS_NREDO` (its
      default point-count rule applies: subsample above int(N * 5 / 3 / k) points per centroid).
    seed: the first run's seed.
    kmeans_fn: the k-means to use (default: `pcl_jax.clustering.kmeans`); tests inject fakes.
    return_assignments: also return the first run's assignments (the one kept in
      assignments_<split>.csv).
  Returns:
    {'k', 'nmi', 'ami', 'ari', 'acc' (means over the runs), 'runs', 'spherical', 'nmi_sd',
     'nmi_runs'}; with `return_assignments`, (that dict, the first run's im2cluster [N] int64).
  """
  if runs < 1:
    raise ValueError(f'clustering_quality needs runs >= 1, got {runs}')
  labels = np.asarray(labels)
  k = int(np.unique(labels).size)
  kmeans_fn = kmeans_fn or clustering.kmeans
  per_run, first_run = [], None
  for run in range(runs):
    _, im2cluster, _ = kmeans_fn(features, k, backend=backend, niter=KMEANS_NITER,
                                 nredo=KMEANS_NREDO, seed=seed + run, spherical=spherical,
                                 use_float16=use_float16)
    im2cluster = np.asarray(im2cluster, np.int64)
    first_run = im2cluster if first_run is None else first_run
    per_run.append(clustering_metrics(labels, im2cluster))
  means = {name: float(np.mean([metrics[name] for metrics in per_run])) for name in per_run[0]}
  nmi_runs = [metrics['nmi'] for metrics in per_run]
  result = {'k': k, **means, 'runs': runs, 'spherical': bool(spherical),
            'nmi_sd': float(np.std(nmi_runs, ddof=1)) if runs > 1 else 0.0,
            'nmi_runs': nmi_runs}
  return (result, first_run) if return_assignments else result
