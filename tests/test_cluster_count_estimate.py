"""benchmarks/cluster_count_estimate.py: the label-free criteria find the clusters of data made
with a known count."""

import numpy as np

from benchmarks import cluster_count_estimate


def test_the_criteria_pick_the_count_of_well_separated_clusters():
  rng = np.random.default_rng(0)
  centres = np.eye(8)[:4] * 5.0  # four orthogonal directions: four clusters after normalising
  features = np.concatenate([centre + rng.normal(scale=0.5, size=(60, 8)) for centre in centres])
  ks = [2, 3, 4, 6, 8]
  scores = cluster_count_estimate.criterion_scores(features, ks)
  for name, (_, higher_is_better) in cluster_count_estimate.CRITERIA.items():
    assert cluster_count_estimate.chosen_k(scores[name], ks, higher_is_better) == 4, name
