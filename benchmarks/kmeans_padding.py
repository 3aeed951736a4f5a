"""What `clustering.pad_k=max` costs and saves: the jax k-means at exact k against every k padded
to the run's largest, at mini-ImageNet's size.

For each N (38,400 and 60,000 points, D = 128) and each cluster count of the notes' schedule
(k = 3200, 2400, 1600, 800, 100), on synthetic unit features (`benchmarks/clustering.py`'s
mixture), it times `clustering.kmeans(..., backend='jax')` at exact k and padded to
`Padding(3200, N)`:
- compile: the first call's wall time less the same call's again (a new shape compiles; a
  padded run compiles once, at its first k);
- per iteration: (time at niter=6 - time at niter=2) / 4, each the best of two calls, one run
  (nredo=1).
Then the schedule's totals: compile seconds and k-means programs, exact against padded. Prints
the table and the padded/exact ratio of the per-iteration time. Owns nothing the library uses.

  python benchmarks/kmeans_padding.py            # the full benchmark (minutes on a CPU)
  python benchmarks/kmeans_padding.py --quick    # a tiny smoke version (seconds)
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top

from benchmarks import clustering as clustering_benchmark
from pcl_jax import clustering
from pcl_jax.clustering import jax_kmeans


def timed(function):
  start = time.perf_counter()
  jax.block_until_ready(function())
  return time.perf_counter() - start


def measure(features, k, padding):
  """(compile s, s per iteration) of the jax k-means of `features` into k clusters."""
  call = lambda niter: clustering.kmeans(features, k, backend='jax', niter=niter, nredo=1,
                                         seed=0, padding=padding)
  compiled_before = jax_kmeans.compilations()
  first = timed(lambda: call(1))
  again = timed(lambda: call(1))
  compiled = jax_kmeans.compilations() - compiled_before
  best = lambda niter: min(timed(lambda: call(niter)) for _ in range(2))
  per_iteration = (best(6) - best(2)) / 4
  return (first - again if compiled else 0.0), max(per_iteration, 0.0), compiled


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--quick', action='store_true', help='tiny smoke version')
  args = parser.parse_args()
  sizes, ks, dim = ((3000, 4000), (200, 150, 100, 50, 10), 32) if args.quick else (
      (38_400, 60_000), (3200, 2400, 1600, 800, 100), 128)
  print(f'jax {jax.__version__} on {jax.default_backend()} ({jax.devices()[0].device_kind}); '
        f'D={dim}, one run (nredo=1), padded to k={max(ks)}')
  print(f'{"N":>7} {"k":>5} | {"exact compile s":>15} {"s/iter":>8} | {"padded compile s":>16} '
        f'{"s/iter":>8} | {"padded/exact s/iter":>19}')
  for num_points in sizes:
    features = jax.numpy.asarray(
        clustering_benchmark.synthetic_features(num_points, dim, max(ks), seed=0))
    paddings = {'exact': None,
                'padded': jax_kmeans.Padding(centroids=max(ks), points=num_points)}
    results = {}
    for name, padding in paddings.items():
      # Each way from an empty cache: a padded run's one program is exact k's largest.
      jax_kmeans._best_of_runs.clear_cache()  # pylint: disable=protected-access
      results[name] = [measure(features, k, padding) for k in ks]
    for k, exact, padded in zip(ks, results['exact'], results['padded']):
      print(f'{num_points:>7} {k:>5} | {exact[0]:>15.2f} {exact[1]:>8.3f} | {padded[0]:>16.2f} '
            f'{padded[1]:>8.3f} | {padded[1] / max(exact[1], 1e-9):>19.2f}')
    total = lambda name, column: sum(row[column] for row in results[name])
    print(f'{num_points:>7} {"all":>5} | compile {total("exact", 0):.2f} s in '
          f'{total("exact", 2)} programs exact, {total("padded", 0):.2f} s in '
          f'{total("padded", 2)} padded')


if __name__ == '__main__':
  main()
