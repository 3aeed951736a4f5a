"""Benchmark of `clustering.levels='balanced'`: what equal-sized clusters cost on top of k-means,
and how even they come out.

For each k, on synthetic features (`benchmarks/clustering.py`'s mixture of Gaussians, N = 60000:
mini-ImageNet's 100 classes x 600, D = 128), times the E-step's k-means (`clustering.kmeans`,
the backend `clustering.backend=auto` picks here, niter 20, nredo 5) and then
`clustering.balanced.rebalance` (SwAV's epsilon 0.05, 3 iterations) on its centroids, and
prints both times, their ratio, and the cluster sizes before and after (largest / mean, and the
number of clusters under a tenth of the mean). Compilation is excluded: each call is timed after
a warm-up at the same shapes, as training pays it once per cluster count. Owns nothing the
library uses.

Usage:
  python benchmarks/balanced_assignments.py            # N=60000, k in 100, 800, 3200
  python benchmarks/balanced_assignments.py --quick    # a tiny smoke version (seconds)
"""

import argparse
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.clustering import synthetic_features  # pylint: disable=g-import-not-at-top,wrong-import-position
from pcl_jax import clustering  # pylint: disable=g-import-not-at-top,wrong-import-position
from pcl_jax.clustering import balanced  # pylint: disable=g-import-not-at-top,wrong-import-position


def timed(function):
  """(wall seconds of function() after one warm-up call, its output)."""
  jax.block_until_ready(function())
  start = time.perf_counter()
  output = jax.block_until_ready(function())
  return time.perf_counter() - start, output


def size_summary(im2cluster, k):
  sizes = np.bincount(np.asarray(im2cluster), minlength=k)
  mean = sizes.mean()
  return f'{sizes.max() / mean:>12.2f} {int((sizes < 0.1 * mean).sum()):>9d}'


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--quick', action='store_true', help='tiny smoke version')
  parser.add_argument('--size', type=int, default=60000, help='N')
  parser.add_argument('--ks', default='100,800,3200', help='comma-separated k')
  parser.add_argument('--epsilon', type=float, default=0.05)
  parser.add_argument('--iterations', type=int, default=3)
  args = parser.parse_args()
  if args.quick:
    args.size, args.ks = 2000, '10,50'
  features = jax.numpy.asarray(synthetic_features(args.size, 128, 100, seed=0))
  backend = clustering.resolve_backend('auto')
  print(f'jax {jax.__version__} on {jax.default_backend()}, {os.cpu_count()} CPUs; N={args.size}, '
        f'D=128, k-means backend {backend} (niter 20, nredo 5), Sinkhorn-Knopp epsilon '
        f'{args.epsilon}, {args.iterations} iterations; seconds per call')
  # Cluster sizes: the largest over the mean, and how many clusters hold under a tenth of it.
  print(f'{"k":>6} {"k-means":>9} {"balance":>9} {"ratio":>7} {"km max/mean":>12} '
        f'{"km small":>9} {"bal max/mean":>12} {"bal small":>9}')
  for k in (int(k) for k in args.ks.split(',')):
    kmeans_s, (centroids, im2cluster, _) = timed(lambda: clustering.kmeans(  # pylint: disable=cell-var-from-loop
        features, k, backend='auto', niter=20, nredo=5, seed=0, spherical=False))
    balance_s, (_, balanced_im2cluster, _) = timed(lambda: balanced.rebalance(  # pylint: disable=cell-var-from-loop
        features, centroids, epsilon=args.epsilon, iterations=args.iterations, spherical=False))
    print(f'{k:>6} {kmeans_s:>9.2f} {balance_s:>9.2f} {balance_s / kmeans_s:>7.3f} '
          f'{size_summary(im2cluster, k)} {size_summary(balanced_im2cluster, k)}', flush=True)


if __name__ == '__main__':
  main()
