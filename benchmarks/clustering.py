"""Benchmark of the E-step clustering backends: faiss-cpu against the pure-JAX k-means.

Times `pcl_jax.clustering.kmeans` per backend on synthetic features (random unit vectors with
cluster structure: a normalised mixture of Gaussians) for N in {38400, 60000}, D=128,
k in {100, 800, 3200}, plus the 3-level window (3200, 2400, 1600) through `cluster_levels`, and
prints a table with the jax/faiss time ratio. Owns nothing the library uses.

Usage:
  python benchmarks/clustering.py            # the full benchmark (several minutes on a CPU)
  python benchmarks/clustering.py --quick    # a tiny smoke version (seconds)
  python benchmarks/clustering.py --backends jax --sizes 60000 --ks 3200

Times are wall-clock seconds of one call after a one-iteration warm-up at the same shapes (so
JAX's compilation, paid once per shape in training, is excluded; the `jax compile` column is
that warm-up's wall time); on a shared machine they are
noisy, and faiss's OpenMP threads suffer most from other processes (see --single-thread).
"""

import argparse
import os
import sys
import time

import numpy as np

# jax, faiss and pcl_jax are imported in main(), after --single-thread has set the thread
# environment they read at import time.
jax = None
clustering = None


def synthetic_features(num_points, dim, num_modes, seed):
  """Unit vectors drawn from a mixture of `num_modes` Gaussians around random unit means."""
  rng = np.random.default_rng(seed)
  means = rng.standard_normal((num_modes, dim)).astype(np.float32)
  means /= np.linalg.norm(means, axis=1, keepdims=True)
  mode = rng.integers(num_modes, size=num_points)
  # Noise of norm ~0.7 around norm-1 means: clusters overlap, like real embeddings.
  noise = rng.standard_normal((num_points, dim)).astype(np.float32) * (0.7 / np.sqrt(dim))
  features = means[mode] + noise
  return features / np.linalg.norm(features, axis=1, keepdims=True)


def time_call(function, warm_up, repeats):
  """(best wall time of `repeats` calls after `warm_up()`, the last call's output, the warm-up's
  wall time: compilation for the jax backend, which training pays once per cluster count)."""
  start = time.perf_counter()
  jax.block_until_ready(warm_up())
  warm_up_s = time.perf_counter() - start
  best, output = float('inf'), None
  for _ in range(repeats):
    start = time.perf_counter()
    output = jax.block_until_ready(function())
    best = min(best, time.perf_counter() - start)
  return best, output, warm_up_s


def kmeans_case(features, k, backend, niter, nredo):
  def run():
    return clustering.kmeans(features, k, backend=backend, niter=niter, nredo=nredo, seed=0,
                             spherical=True)
  return run


def window_case(features, ks, backend, niter, nredo, args):
  def run():
    levels = clustering.cluster_levels(features, ks, backend=backend, niter=niter,
                                       nredo=nredo, seed=0, spherical=True,
                                       levels='hierarchical' if args.hierarchical else 'flat',
                                       temperature=0.2,
                                       use_float16=True)
    return [level['concentration'] for level in levels]
  return run


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--quick', action='store_true', help='tiny smoke version')
  parser.add_argument('--sizes', default='38400,60000', help='comma-separated N')
  parser.add_argument('--ks', default='100,800,3200', help='comma-separated k')
  parser.add_argument('--window', default='3200,2400,1600', help='levels of the window case')
  parser.add_argument('--dim', type=int, default=128)
  parser.add_argument('--modes', type=int, default=100, help='Gaussian mixture components')
  parser.add_argument('--niter', type=int, default=20)
  parser.add_argument('--nredo', type=int, default=5)
  parser.add_argument('--repeats', type=int, default=1, help='timed calls per case (best kept)')
  parser.add_argument('--backends', default='faiss-cpu,jax')
  parser.add_argument('--hierarchical', action='store_true', help='window in hierarchical mode')
  parser.add_argument('--single-thread', action='store_true',
                      help='one thread for both faiss (OpenMP) and XLA: steadier numbers on a '
                      'shared machine, where OpenMP spin-waits suffer most')
  args = parser.parse_args()
  if args.quick:
    args.sizes, args.ks, args.window = '2000', '10,50', '50,30,20'
    args.dim, args.modes, args.niter, args.nredo = 32, 10, 5, 2
  return args


def main():
  global jax, clustering
  args = parse_args()
  if args.single_thread:
    os.environ['OMP_NUM_THREADS'] = '1'
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                               ' --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1')
  import jax  # pylint: disable=g-import-not-at-top,redefined-outer-name
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from pcl_jax import clustering  # pylint: disable=g-import-not-at-top,redefined-outer-name
  backends = args.backends.split(',')
  sizes = [int(n) for n in args.sizes.split(',')]
  ks = [int(k) for k in args.ks.split(',')]
  window = [int(k) for k in args.window.split(',')]
  threads = '1 thread' if args.single_thread else f'{os.cpu_count()} CPUs'
  print(f'jax {jax.__version__} on {jax.default_backend()}, {threads}; '
        f'D={args.dim}, niter={args.niter}, nredo={args.nredo}; seconds per call')
  header = f'{"N":>6} {"case":>16} ' + ' '.join(f'{b:>10}' for b in backends)
  if 'jax' in backends and len(backends) > 1:
    header += f' {"jax/" + backends[0]:>14} {"obj jax/" + backends[0]:>16}'
  if 'jax' in backends:
    header += f' {"jax compile":>12}'
  print(header)
  for num_points in sizes:
    features = jax.numpy.asarray(synthetic_features(num_points, args.dim, args.modes, seed=0))
    cases = [(f'k={k}', k) for k in ks] + [('window ' + '/'.join(map(str, window)), window)]
    for name, case in cases:
      times, objectives, warm_up_s = {}, {}, {}
      for backend in backends:
        # The warm-up (one iteration, one run) compiles everything the jax backend needs, since
        # niter and nredo are traced; faiss has nothing to warm up.
        if isinstance(case, list):
          timed = window_case(features, case, backend, args.niter, args.nredo, args)
          warm_up = window_case(features, case, backend, 1, 1, args)
          times[backend], _, warm_up_s[backend] = time_call(timed, warm_up, args.repeats)
        else:
          timed = kmeans_case(features, case, backend, args.niter, args.nredo)
          warm_up = kmeans_case(features, case, backend, 1, 1)
          times[backend], (_, _, sq_dist), warm_up_s[backend] = time_call(timed, warm_up,
                                                                          args.repeats)
          # k-means objective: sum of squared distances to the returned centroids.
          objectives[backend] = float(np.asarray(sq_dist, np.float64).sum())
      row = f'{num_points:>6} {name:>16} ' + ' '.join(f'{times[b]:>10.2f}' for b in backends)
      if 'jax' in backends and len(backends) > 1:
        row += f' {times["jax"] / times[backends[0]]:>14.2f}'
        if objectives:
          row += f' {objectives["jax"] / objectives[backends[0]]:>16.4f}'
        else:
          row += f' {"":>16}'
      if 'jax' in backends:
        # The warm-up call (one iteration, one run) is compilation plus a negligible run.
        row += f' {warm_up_s["jax"]:>12.2f}'
      print(row, flush=True)


if __name__ == '__main__':
  main()
