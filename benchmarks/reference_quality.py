r"""Representation quality of pcl_jax against the PyTorch reference's own training, scored by one
code path.

  python benchmarks/reference_quality.py \
      --reference /tmp/ref/seed0,/tmp/ref/seed1,/tmp/ref/seed2 \
      --runs /tmp/study/plain/seed0,/tmp/study/plain/seed1,/tmp/study/plain/seed2 \
      --config configs/small_images_plain.py --config.data.root /tmp/dev_patches

`--reference` names output directories of ../shared/reference/pcl_reference.py (their
`features_train.npz` and `features_test.npz`), `--runs` pcl_jax run directories already evaluated
(`eval/results.json`, e.g. a study's cells). Each reference directory is scored by
`python -m pcl_jax.evaluation.score`'s `score_features` with `--config`'s eval settings (into
DIR/scores_test.json), which is `--mode=eval`'s own scoring, so both sides are measured alike.

Prints, per metric, each side's mean ± the half-width of its Student-t 95% interval over seeds,
and pcl_jax minus the reference with Welch's 95% interval and two-sided p. The two sides' seeds
draw different random streams, so the comparison is unpaired.
"""

import argparse
import json
import os
import sys

import numpy as np
from scipy import stats

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pcl_jax.evaluation import score  # pylint: disable=wrong-import-position
from pcl_jax.study import report as study_report  # pylint: disable=wrong-import-position
from pcl_jax.study import spec as study_spec  # pylint: disable=wrong-import-position

METRICS = ('knn_top1', 'linear_top1', 'fewshot_5w1s', 'fewshot_5w5s', 'nmi')


def welch(ours, theirs):
  """(difference of means, its Welch-Satterthwaite 95% half-width, two-sided p)."""
  a, b = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
  dof = (va + vb) ** 2 / (va ** 2 / (a.size - 1) + vb ** 2 / (b.size - 1))
  half = stats.t.ppf(0.975, dof) * np.sqrt(va + vb)
  return float(a.mean() - b.mean()), float(half), float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def _metrics(results):
  return study_report.cell_metrics(results, [])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--reference', required=True, help='comma-separated reference output dirs')
  parser.add_argument('--runs', required=True, help='comma-separated evaluated pcl_jax run dirs')
  parser.add_argument('--config', default='configs/small_images_plain.py')
  parser.add_argument('--config.data.root', dest='data_root', default='')
  args = parser.parse_args()
  config = study_spec.load_config(args.config, '--config')
  if args.data_root:
    config.data.root = args.data_root
  reference = []
  for directory in args.reference.split(','):
    out = os.path.join(directory, 'scores_test.json')
    reference.append(_metrics(score.score_features(config, directory, out, overwrite=True)))
  ours = []
  for directory in args.runs.split(','):
    with open(os.path.join(directory, 'eval', 'results.json')) as handle:
      ours.append(_metrics(json.load(handle)))
  print(f'\n{len(ours)} pcl_jax runs against {len(reference)} reference runs; mean ± 95% '
        'interval over seeds; difference pcl_jax - reference, Welch 95% interval and p')
  print(f"{'metric':14s} {'pcl_jax':>22s} {'reference':>22s} {'difference':>26s}")
  for metric in METRICS:
    a = [m[metric] for m in ours]
    b = [m[metric] for m in reference]
    ma, mb = study_report.mean_ci(a), study_report.mean_ci(b)
    diff, half, p = welch(a, b)
    values = lambda v: '[' + ' '.join(f'{x:.3g}' for x in v) + ']'
    print(f"{metric:14s} {ma['mean']:9.3f} ± {ma['ci95']:6.3f} {values(a):>0s}  "
          f"{mb['mean']:9.3f} ± {mb['ci95']:6.3f} {values(b)}  {diff:+8.3f} ± {half:6.3f} "
          f"(p={p:.2f})")


if __name__ == '__main__':
  main()
