r"""The clustering stage (`eval.cluster_head`) against the evaluation's k-means, paired by seed.

  python benchmarks/cluster_head.py \
      --set small=/tmp/feat_runs/small/seed{seed}/eval --set ref=/tmp/feat_runs/ref/seed{seed} \
      --seeds 0,1,2
  python benchmarks/cluster_head.py --tune /tmp/feat_runs/small/seed0/eval/features_train.npz

Each `--set NAME=DIR` names a directory pattern (`{seed}` is replaced by each seed) holding
`features_train.npz` and `features_test.npz` (what `eval.save_features` and the reference
script write): one pretraining run per seed. For each run, on the test split, k = its classes:
- k-means: the evaluation's (`clustering_quality`, mean of `eval.kmeans_runs` = 10 runs);
- head: `cluster_head.cluster_head_results` as `--mode=eval` runs it (fitted on the test and
  train features together, scored on the test split; `--fit=test`: on the test features alone).
Prints NMI and Hungarian accuracy per run, then per set the paired difference head - k-means
over the seeds: mean and 95% Student-t interval (pcl_jax.study.report.paired_difference).

`--tune FILE` is how the module's settings were chosen: on one file's features alone (the
training split of one run; no test picture is looked at), each setting of the grid is fitted
with head seeds 0, 1, 2 and scored on that file's labels, beside k-means on the same file.
"""

import argparse
import itertools
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=wrong-import-position
from pcl_jax.evaluation import cluster_head
from pcl_jax.evaluation import clustering_quality
from pcl_jax.study import report

KMEANS_RUNS = 10  # configs/default.py eval.kmeans_runs
TUNE_GRID = {'entropy_weight': (1.0, 2.0, 3.0, 5.0), 'num_neighbours': (10, 20, 50),
             'learning_rate': (1e-2, 3e-2)}
TUNE_HEAD_SEEDS = (0, 1, 2)


def _load(path: str):
  with np.load(path) as data:
    return data['features'], data['labels']


def compare_run(directory: str, fit: str) -> dict:
  """k-means and head NMI / accuracy on one run's test split; the head fitted on the test and
  train features (`fit='both'`, as the evaluation does) or on the test features alone."""
  test_x, test_y = _load(os.path.join(directory, 'features_test.npz'))
  train_x = _load(os.path.join(directory, 'features_train.npz'))[0] if fit == 'both' else None
  kmeans = clustering_quality.clustering_quality(test_x, test_y, runs=KMEANS_RUNS)
  start = time.perf_counter()
  head, _ = cluster_head.cluster_head_results(test_x, test_y, kmeans['k'], train_x)
  seconds = time.perf_counter() - start
  return {'kmeans_nmi': kmeans['nmi'], 'kmeans_acc': kmeans['acc'], 'head_nmi': head['nmi'],
          'head_acc': head['acc'], 'seconds': seconds, 'num_fit': head['num_fit']}


def compare(sets, seeds, fit: str) -> None:
  for name, pattern in sets:
    rows = []
    print(f'== {name}: {pattern}')
    print(f'{"seed":>4s} {"k-means NMI":>11s} {"head NMI":>9s} {"k-means acc":>11s} '
          f'{"head acc":>9s} {"fit on":>7s} {"time":>6s}')
    for seed in seeds:
      row = compare_run(pattern.format(seed=seed), fit)
      rows.append(row)
      print(f'{seed:4d} {row["kmeans_nmi"]:11.4f} {row["head_nmi"]:9.4f} {row["kmeans_acc"]:11.2f} '
            f'{row["head_acc"]:9.2f} {row["num_fit"]:7d} {row["seconds"]:5.1f}s', flush=True)
    for metric in ('nmi', 'acc') if len(rows) > 1 else ():  # an interval needs 2 seeds
      paired = report.paired_difference([r[f'head_{metric}'] for r in rows],
                                        [r[f'kmeans_{metric}'] for r in rows])
      kmeans = report.mean_ci([r[f'kmeans_{metric}'] for r in rows])
      print(f'{name} {metric}: k-means {kmeans["mean"]:.4f} +- {kmeans["ci95"]:.4f} (seeds); '
            f'head - k-means {paired["diff"]:+.4f} +- {paired["ci95"]:.4f} '
            f'(95% t, n={paired["n"]}, p={paired["p"]:.3f})')


def tune(path: str) -> None:
  features, labels = _load(path)
  k = int(np.unique(labels).size)
  kmeans = clustering_quality.clustering_quality(features, labels, runs=KMEANS_RUNS)
  print(f'{path}: k={k}, k-means NMI {kmeans["nmi"]:.4f} acc {kmeans["acc"]:.2f}')
  names = sorted(TUNE_GRID)
  for values in itertools.product(*(TUNE_GRID[name] for name in names)):
    setting = dict(zip(names, values))
    scores = [clustering_quality.clustering_metrics(
        labels, cluster_head.fit_assign(features, k, seed=seed, **setting)['assignments'])
              for seed in TUNE_HEAD_SEEDS]
    nmi, acc = (np.mean([s[m] for s in scores]) for m in ('nmi', 'acc'))
    print(f'{setting}: NMI {nmi:.4f} acc {acc:.2f} (mean of head seeds '
          f'{list(TUNE_HEAD_SEEDS)})', flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--set', action='append', default=[], help='NAME=DIR with {seed}')
  parser.add_argument('--seeds', default='0,1,2')
  parser.add_argument('--fit', choices=('both', 'test'), default='both',
                      help='fit the head on the test and train features, or on the test alone')
  parser.add_argument('--tune', help='features_<split>.npz to choose the settings on')
  args = parser.parse_args()
  if args.tune:
    tune(args.tune)
  sets = [entry.split('=', 1) for entry in args.set]
  compare(sets, [int(seed) for seed in args.seeds.split(',')], args.fit)


if __name__ == '__main__':
  main()
