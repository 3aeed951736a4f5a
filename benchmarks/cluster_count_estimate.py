r"""Can the class count be estimated from a trained run's features, without labels?

  python benchmarks/cluster_count_estimate.py --features RUN/eval/features_train.npz,... \
      [--ks 2,3,4,5,6,8,10,12,15,20,30,50]

Each file is `features_<split>.npz` as `--config.eval.save_features=True` writes it. For each,
k-means (scikit-learn, 3 restarts, seed 0) on the L2-normalised features for every k of the grid,
and three label-free criteria of the partition: the silhouette (highest best), Davies-Bouldin
(lowest best) and Calinski-Harabasz (highest best). Prints the k each one picks next to the
number of classes in the file's labels, which none of them reads.

Why: a cluster list that ends near the class count (the notes' k = 2-10) is the one PCL change
docs/remedies.md leaves untried, because unseen data does not say its class count. A criterion
that finds it from the features would let an E-step choose the last level's k itself.
"""

import argparse

import numpy as np
from sklearn import cluster
from sklearn import metrics

CRITERIA = {  # name -> (score function, True when higher is better)
    'silhouette': (metrics.silhouette_score, True),
    'davies_bouldin': (metrics.davies_bouldin_score, False),
    'calinski_harabasz': (metrics.calinski_harabasz_score, True),
}


def criterion_scores(features: np.ndarray, ks) -> dict:
  """{criterion: [len(ks)] scores} of k-means partitions of the L2-normalised features."""
  unit = features / np.linalg.norm(features, axis=1, keepdims=True)
  scores = {name: [] for name in CRITERIA}
  for k in ks:
    assignment = cluster.KMeans(k, n_init=3, random_state=0).fit_predict(unit)
    for name, (score, _) in CRITERIA.items():
      scores[name].append(score(unit, assignment))
  return {name: np.array(values) for name, values in scores.items()}


def chosen_k(scores: np.ndarray, ks, higher_is_better: bool) -> int:
  return ks[int(np.argmax(scores) if higher_is_better else np.argmin(scores))]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--features', required=True, help='comma-separated features_<split>.npz')
  parser.add_argument('--ks', default='2,3,4,5,6,8,10,12,15,20,30,50')
  args = parser.parse_args()
  ks = [int(k) for k in args.ks.split(',')]
  print('file | classes | ' + ' | '.join(f'{name} k' for name in CRITERIA))
  for path in args.features.split(','):
    data = np.load(path)
    scores = criterion_scores(data['features'].astype(np.float64), ks)
    picks = [chosen_k(scores[name], ks, higher) for name, (_, higher) in CRITERIA.items()]
    print(f'{path} | {len(np.unique(data["labels"]))} | ' + ' | '.join(map(str, picks)))
    print('  silhouette over k ' + ' '.join(f'{k}:{s:.3f}' for k, s in zip(ks, scores['silhouette'])))


if __name__ == '__main__':
  main()
