r"""How much one k-means run's NMI moves with its seed alone, on fixed features.

  python benchmarks/nmi_seed_spread.py --features RUN/eval/features_test.npz,... [--seeds 20]

Each file is `features_<split>.npz` as `--config.eval.save_features=True` writes it. For each,
the evaluation's k-means (`clustering_quality`, k = classes, its fixed settings) is run with
seeds 0 .. seeds-1, one run each; prints the NMI's mean and standard deviation over the seeds,
and that standard deviation divided by sqrt(eval.kmeans_runs=10), the spread left in the mean
the evaluation reports. The run-to-run differences come from the k-means initialisation only:
the features do not change.
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pcl_jax.evaluation import clustering_quality  # pylint: disable=wrong-import-position

RUNS_AVERAGED = 10  # configs/default.py eval.kmeans_runs


def seed_spread(path: str, seeds: int, backend: str):
  """NMI of one k-means run per seed on the file's features: [seeds] array."""
  data = np.load(path)
  return np.array([clustering_quality.clustering_quality(
      data['features'], data['labels'], runs=1, seed=seed, backend=backend,
      use_float16=False)['nmi'] for seed in range(seeds)])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--features', required=True, help='comma-separated features_<split>.npz')
  parser.add_argument('--seeds', type=int, default=20)
  parser.add_argument('--backend', default='auto', help='clustering backend: auto | faiss | jax')
  args = parser.parse_args()
  sds = []
  print(f'{"file":60s} {"NMI mean":>9s} {"sd":>7s} {"sd/sqrt(10)":>12s}')
  for path in args.features.split(','):
    nmi = seed_spread(path, args.seeds, args.backend)
    sd = nmi.std(ddof=1)
    sds.append(sd)
    print(f'{path[-60:]:60s} {nmi.mean():9.4f} {sd:7.4f} {sd / np.sqrt(RUNS_AVERAGED):12.4f}')
  print(f'mean sd over {len(sds)} files: {np.mean(sds):.4f} (one run), '
        f'{np.mean(sds) / np.sqrt(RUNS_AVERAGED):.4f} (mean of {RUNS_AVERAGED})')


if __name__ == '__main__':
  main()
