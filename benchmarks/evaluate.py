r"""Benchmark of the evaluation metrics on a mini-ImageNet-test-sized split of synthetic features.

  python benchmarks/evaluate.py                      # 20 classes x 600 = 12,000 x 128-d
  python benchmarks/evaluate.py --classes=20 --per_class=600 --dim=128 --episodes=2000

Times every part of `driver.evaluate_features` (what `--mode=eval` runs after the feature pass):
kNN and the linear probe on the within-split halves (mini-ImageNet's `test` classes are disjoint
from `train`), few-shot 5-way 1-shot and 5-shot with both classifiers, and k-means clustering
quality with the project backend (`--backend`). Each part runs twice: the first run includes
XLA compilation, the second is the steady-state cost. The features are Gaussian clusters
(`--noise` sets how hard they are), so only the times are meaningful, not the accuracies.
On a shared CPU the numbers are noisy; rerun and compare on the same machine.
"""

import argparse
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import default  # pylint: disable=g-import-not-at-top,wrong-import-position
from pcl_jax.evaluation import driver
from pcl_jax.evaluation import linear_probe


def synthetic_features(classes: int, per_class: int, dim: int, noise: float, seed: int = 0):
  rng = np.random.default_rng(seed)
  centers = rng.normal(size=(classes, dim))
  labels = np.repeat(np.arange(classes), per_class)
  features = centers[labels] + noise * rng.normal(size=(labels.size, dim))
  features /= np.linalg.norm(features, axis=1, keepdims=True)
  return features.astype(np.float32), labels


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--classes', type=int, default=20)
  parser.add_argument('--per_class', type=int, default=600)
  parser.add_argument('--dim', type=int, default=128)
  parser.add_argument('--noise', type=float, default=2.0)
  parser.add_argument('--episodes', type=int, default=2000)
  parser.add_argument('--backend', default='auto', help='clustering.backend: auto | faiss | jax')
  args = parser.parse_args()

  config = default.get_config()
  config.eval.fewshot_episodes = args.episodes
  config.clustering.backend = args.backend
  features, labels = synthetic_features(args.classes, args.per_class, args.dim, args.noise)
  features = jax.device_put(features)
  print(f'{labels.size} images x {args.dim}-d, {args.classes} classes; jax backend '
        f'{jax.default_backend()} ({jax.devices()[0].device_kind}); clustering.backend='
        f'{args.backend}; {args.episodes} episodes per few-shot setting')

  runs = []
  for _ in range(2):
    results = driver.evaluate_features(config, features, labels)  # within-split halves
    runs.append(results)
  first, second = runs[0]['timing_s'], runs[1]['timing_s']
  knn = runs[1]['knn']
  rows = [(f"kNN (k={knn['k']}, {knn['num_reference']} ref -> {knn['num_query']} queries)",
           'knn'),
          (f'linear probe ({len(linear_probe.PROBE_LEARNING_RATES)} lr x {linear_probe.PROBE_STEPS} '
           'steps)', 'linear_probe'),
          ('few-shot 2 settings x 2 classifiers', 'fewshot'),
          (f'k-means k={args.classes} + NMI/AMI/ARI/acc', 'clustering'), ('total', 'total')]
  print(f"\n{'part':<40} {'1st run (compile) s':>20} {'2nd run s':>10}")
  for name, key in rows:
    print(f'{name:<40} {first[key]:>20.2f} {second[key]:>10.2f}')
  result = runs[1]
  print(f"\nfew-shot 5-way 1-shot / 5-shot steady state: {args.episodes} episodes each; "
        f"accuracies (synthetic, sanity only): kNN {result['knn_top1']:.1f}%, linear "
        f"{result['linear_top1']:.1f}%, 1-shot {result['fewshot']['5way1shot']['mean']:.1f}%, "
        f"5-shot {result['fewshot']['5way5shot']['mean']:.1f}%, NMI "
        f"{result['clustering']['nmi']:.3f}")
  print('note: shared, noisy CPU machines give noisy times; compare runs on the same machine.')


if __name__ == '__main__':
  main()
