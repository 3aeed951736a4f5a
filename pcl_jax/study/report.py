r"""A study's numbers: per-cell metrics, statistics over seeds, and report.json / .md / .png.

This module owns what a study reports (see docs/studies.md): the metrics read from one cell's
files (`cell_metrics`, a pure function of its eval results and its metrics.jsonl records), the
statistics over seeds (`mean_ci`, `paired_difference`: Student-t intervals and the paired
t-test), and the three report files. It reads nothing but what it is handed and writes only the
report files; running cells is `runner`'s. It imports neither jax nor torch nor pyplot.

Statistics, per variant and metric, over the seeds whose cell has the value:
- `mean`; `ci95`: half-width of the Student-t 95% interval of the mean,
  t(0.975, n-1) * sd / sqrt(n), sd with n-1 in the denominator; `values`: one per study seed
  (in the order of `seeds`), null where the cell is missing or has no such value.
- Paired against the baseline, over the seeds both have: `diff`, the mean of (variant -
  baseline); `ci95`, the same t half-width of that mean; `p`, the two-sided paired t-test.
  Differences that are all equal give ci95 0 and p 1 (all zero) or 0 (not zero).
- With fewer than two values `ci95` and `p` are null (never NaN).
"""

import json
import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
import numpy as np
from scipy import stats

from pcl_jax.run import files as run_files
from pcl_jax.study import plot
from pcl_jax.study import spec

# (metric, group, decimals shown, what it is), in report order.
METRICS = (
    ('knn_top1', 'downstream', 2,
     'kNN top-1 (%) on data.eval_split (eval/results.json knn_top1)'),
    ('linear_top1', 'downstream', 2, 'linear-probe top-1 (%) (results.json linear_top1)'),
    ('fewshot_5w1s', 'downstream', 2,
     '5-way 1-shot accuracy (%), nearest centroid, mean over episodes '
     '(results.json fewshot.5way1shot.mean)'),
    ('fewshot_5w5s', 'downstream', 2,
     '5-way 5-shot accuracy (%), as fewshot_5w1s (results.json fewshot.5way5shot.mean)'),
    ('nmi', 'downstream', 3,
     'NMI in [0, 1] of k-means with k = classes on the eval features (results.json '
     'clustering.nmi)'),
    ('final_acc_inst', 'training', 2,
     'instance (InfoNCE) accuracy (%) of the last epoch (metrics.jsonl acc_inst)'),
    ('final_acc_proto', 'training', 2,
     'prototype accuracy (%) of the last epoch (metrics.jsonl acc_proto); null when the last '
     'epoch was still warm-up'),
    ('best_val_knn', 'validation', 2,
     'best validation kNN top-1 (%) over the epochs that measured it (metrics.jsonl '
     'val_knn_top1, eval.val_every > 0); null without validation'),
    ('best_val_epoch', 'validation', 1,
     'the epoch of best_val_knn (metrics.jsonl numbering, from 0; its checkpoint is epoch + 1), '
     'the earliest on ties'),
    ('overfit_gap', 'validation', 2,
     'best_val_knn minus the last validation kNN: what training past the best epoch lost'),
)
METRIC_NAMES = tuple(name for name, _, _, _ in METRICS)
GROUPS = (
    ('downstream', 'Downstream evaluation (eval/results.json on data.eval_split)'),
    ('training', 'Training accuracy of the last epoch (metrics.jsonl)'),
    ('validation', 'Validation kNN and over-fitting (metrics.jsonl; needs eval.val_every > 0)'),
)
VAL_KEY = 'val_knn_top1'
REPORT_FILES = spec.REPORT_FILES


# ------------------------------------------------------------------------------------------
# One cell's metrics


def _number(value) -> Optional[float]:
  """`value` as a finite float, else None (null, a skipped entry, NaN)."""
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return None
  return float(value) if math.isfinite(value) else None


def _nested(results: Optional[dict], *keys) -> Optional[float]:
  node = results
  for key in keys:
    if not isinstance(node, dict):
      return None
    node = node.get(key)
  return _number(node)


def by_epoch(records: Sequence[dict]) -> List[dict]:
  """Records sorted by epoch, the later record winning when an epoch appears twice."""
  latest = {}
  for record in records:
    if isinstance(record, dict) and isinstance(record.get('epoch'), int):
      latest[record['epoch']] = record
  return [latest[epoch] for epoch in sorted(latest)]


def validation_curve(records: Sequence[dict]) -> List[Tuple[int, float]]:
  """(epoch, validation kNN top-1) of every epoch that measured it, in epoch order."""
  return [(r['epoch'], _number(r[VAL_KEY])) for r in by_epoch(records)
          if _number(r.get(VAL_KEY)) is not None]


def cell_metrics(results: Optional[dict], records: Sequence[dict]) -> Dict[str, Optional[float]]:
  """Every metric of `METRICS` for one cell; None where the cell does not have it.

  Args:
    results: the cell's eval results (eval/results_<split>.json, DESIGN.md section 3), or None.
    records: the cell's metrics.jsonl records (one per epoch).
  """
  epochs = by_epoch(records)
  last = epochs[-1] if epochs else {}
  curve = validation_curve(epochs)
  best_val = best_epoch = gap = None
  if curve:
    best_epoch, best_val = max(curve, key=lambda point: (point[1], -point[0]))
    gap = best_val - curve[-1][1]
  return {
      'knn_top1': _nested(results, 'knn_top1'),
      'linear_top1': _nested(results, 'linear_top1'),
      'fewshot_5w1s': _nested(results, 'fewshot', '5way1shot', 'mean'),
      'fewshot_5w5s': _nested(results, 'fewshot', '5way5shot', 'mean'),
      'nmi': _nested(results, 'clustering', 'nmi'),
      'final_acc_inst': _number(last.get('acc_inst')),
      'final_acc_proto': _number(last.get('acc_proto')),
      'best_val_knn': best_val,
      'best_val_epoch': None if best_epoch is None else float(best_epoch),
      'overfit_gap': gap,
  }


# ------------------------------------------------------------------------------------------
# Statistics


def _t_half_width(values: np.ndarray) -> float:
  """Half-width of the Student-t 95% interval of the mean of `values` (n >= 2)."""
  n = values.size
  return float(stats.t.ppf(0.975, n - 1) * values.std(ddof=1) / math.sqrt(n))


def mean_ci(values: Sequence[Optional[float]]) -> dict:
  """{'mean', 'ci95', 'n'} of the non-null `values` (ci95 None below two values; mean None
  with none)."""
  present = np.asarray([v for v in values if v is not None], np.float64)
  if present.size == 0:
    return {'mean': None, 'ci95': None, 'n': 0}
  ci95 = _t_half_width(present) if present.size >= 2 else None
  return {'mean': float(present.mean()), 'ci95': ci95, 'n': int(present.size)}


def paired_difference(variant: Sequence[Optional[float]],
                      baseline: Sequence[Optional[float]]) -> dict:
  """{'diff', 'ci95', 'p', 'n'}: variant minus baseline over the positions (seeds) where both
  are non-null; mean difference, its t half-width and the two-sided paired t-test p."""
  diffs = np.asarray([a - b for a, b in zip(variant, baseline)
                      if a is not None and b is not None], np.float64)
  n = int(diffs.size)
  if n == 0:
    return {'diff': None, 'ci95': None, 'p': None, 'n': 0}
  diff = float(diffs.mean())
  if n < 2:
    return {'diff': diff, 'ci95': None, 'p': None, 'n': n}
  sd = float(diffs.std(ddof=1))
  if sd == 0.0:  # t is 0/0 or infinite: p is its limit
    return {'diff': diff, 'ci95': 0.0, 'p': 1.0 if diff == 0.0 else 0.0, 'n': n}
  t_stat = diff / (sd / math.sqrt(n))
  p = float(2.0 * stats.t.sf(abs(t_stat), n - 1))
  return {'diff': diff, 'ci95': _t_half_width(diffs), 'p': p, 'n': n}


def significant(paired: dict) -> bool:
  """Whether the 95% interval of a paired difference excludes 0 (p < 0.05)."""
  return paired.get('ci95') is not None and abs(paired['diff']) > paired['ci95']


def _mean_curve(curves: Sequence[Sequence[Tuple[int, float]]]) -> dict:
  """{'epochs', 'mean', 'n'}: the validation kNN per epoch averaged over the seeds having it."""
  per_epoch = {}
  for curve in curves:
    for epoch, value in curve:
      per_epoch.setdefault(epoch, []).append(value)
  epochs = sorted(per_epoch)
  return {'epochs': epochs, 'mean': [float(np.mean(per_epoch[e])) for e in epochs],
          'n': [len(per_epoch[e]) for e in epochs]}


def build_report(study: dict, baseline: str, variants: Sequence[str], seeds: Sequence[int],
                 cells: Dict[Tuple[str, int], Optional[dict]],
                 curves: Optional[Dict[Tuple[str, int], list]] = None,
                 diverged: Optional[Dict[str, str]] = None) -> dict:
  """The report.json payload.

  Args:
    study: what the study was (name, file, config, overrides, ...), stored as given.
    baseline: the baseline variant.
    variants: every variant, in study order.
    seeds: every seed, in study order.
    cells: (variant, seed) -> that cell's `cell_metrics`, or None when it is not finished.
    curves: (variant, seed) -> `validation_curve` of finished cells.
    diverged: 'variant/seed<k>' -> why, for cells whose training diverged (not 'missing':
      reruns do not retry them).
  Returns:
    {'baseline', 'seeds', 'variants', 'paired', 'missing', 'diverged', 'curves', 'study',
     'metrics_help'} (module docstring; docs/studies.md).
  """
  curves = curves or {}
  values = {variant: {metric: [(cells.get((variant, seed)) or {}).get(metric)
                               for seed in seeds] for metric in METRIC_NAMES}
            for variant in variants}
  report_variants = {
      variant: {metric: dict(mean_ci(values[variant][metric]), values=values[variant][metric])
                for metric in METRIC_NAMES} for variant in variants}
  paired = {variant: {metric: paired_difference(values[variant][metric],
                                                values[baseline][metric])
                      for metric in METRIC_NAMES}
            for variant in variants if variant != baseline}
  diverged = dict(diverged or {})
  missing = [f'{variant}/seed{seed}' for variant in variants for seed in seeds
             if cells.get((variant, seed)) is None and f'{variant}/seed{seed}' not in diverged]
  return {
      'baseline': baseline, 'seeds': list(seeds), 'variants': report_variants,
      'paired': paired, 'missing': missing, 'diverged': diverged,
      'curves': {variant: _mean_curve([curves[(variant, seed)] for seed in seeds
                                       if (variant, seed) in curves]) for variant in variants},
      'study': study,
      'metrics_help': {name: help_text for name, _, _, help_text in METRICS},
  }


# ------------------------------------------------------------------------------------------
# report.md


def _fmt(value: Optional[float], decimals: int, sign: bool = False) -> str:
  if value is None:
    return '–'
  return f'{value:+.{decimals}f}' if sign else f'{value:.{decimals}f}'


def _fmt_p(p: Optional[float]) -> str:
  if p is None:
    return ''
  return ' (p<0.001)' if p < 0.001 else f' (p={p:.2g})'


def format_mean(entry: dict, decimals: int) -> str:
  """'mean ± ci95' (or 'mean' with one value, '–' with none)."""
  if entry['mean'] is None:
    return '–'
  if entry['ci95'] is None:
    return _fmt(entry['mean'], decimals)
  return f"{_fmt(entry['mean'], decimals)} ± {_fmt(entry['ci95'], decimals)}"


def format_paired(entry: dict, decimals: int) -> str:
  """'diff ± ci95 (p=...)', in bold with a trailing * when the interval excludes 0."""
  if entry['diff'] is None:
    return '–'
  text = _fmt(entry['diff'], decimals, sign=True)
  if entry['ci95'] is not None:
    text += f" ± {_fmt(entry['ci95'], decimals)}{_fmt_p(entry['p'])}"
  return f'**{text}** \\*' if significant(entry) else text


def _override_text(overrides: dict) -> str:
  if not overrides:
    return '(none)'
  return ', '.join(f'`{key}={value!r}`' for key, value in overrides.items())


def format_markdown(report: dict) -> str:
  """report.md: what was run, how to rerun it, and a table per metric group."""
  study = report['study']
  variants = list(report['variants'])
  seeds = report['seeds']
  lines = [f"# Study `{study.get('name', '')}`", '']
  lines.append(f"Study file `{study.get('file')}`, base config `{study.get('config')}`, "
               f"baseline `{report['baseline']}`, seeds {', '.join(map(str, seeds))}.")
  lines.append('')
  lines.append(f"- every cell: {_override_text(study.get('overrides', {}))}")
  if study.get('command_line_overrides'):
    lines.append('- command line (applied last, to every cell): '
                 f"{_override_text(study['command_line_overrides'])}")
  for variant in variants:
    lines.append(f"- variant `{variant}`: "
                 f"{_override_text(study.get('variants', {}).get(variant, {}))}")
  lines += ['', 'Reproduce (reruns skip finished cells):', '',
            f"    {study.get('command', '')}", '']
  total = len(variants) * len(seeds)
  finished = total - len(report['missing']) - len(report.get('diverged', {}))
  status = f'{finished} of {total} cells finished.'
  if report['missing']:
    status += (' Missing (left out of every number below): '
               f"{', '.join(report['missing'])}.")
  lines += [status, '']
  if report.get('diverged'):
    lines += ['Diverged (training stopped on a non-finite value; left out): ' +
              '; '.join(f'{cell}: {why}' for cell, why in report['diverged'].items()), '']
  lines += [
      'Each entry: mean ± half-width of the Student-t 95% interval over seeds. Δ: the paired '
      f"difference variant − `{report['baseline']}` over the seeds both have, ± its t-interval "
      'half-width, with the two-sided paired t-test p. **Bold \\*** marks a difference whose 95% '
      'interval excludes 0. A lone value has no interval.', '']
  decimals = {name: shown for name, _, shown, _ in METRICS}
  for group, title in GROUPS:
    metrics = [name for name, metric_group, _, _ in METRICS if metric_group == group]
    header = ['variant']
    for metric in metrics:
      header += [metric, f'Δ {metric}']
    lines += [f'## {title}', '', '| ' + ' | '.join(header) + ' |',
              '|' + '---|' * len(header)]
    for variant in variants:
      row = [f'`{variant}`' + (' (baseline)' if variant == report['baseline'] else '')]
      for metric in metrics:
        row.append(format_mean(report['variants'][variant][metric], decimals[metric]))
        paired = report['paired'].get(variant)
        row.append(format_paired(paired[metric], decimals[metric]) if paired else '')
      lines.append('| ' + ' | '.join(row) + ' |')
    lines.append('')
  lines += ['## Metrics', '']
  lines += [f'- `{name}`: {help_text}' for name, _, _, help_text in METRICS]
  return '\n'.join(lines) + '\n'


# ------------------------------------------------------------------------------------------
# report.png


def plot_report(report: dict, out: str) -> None:
  """report.png: a bar per variant with its 95% interval and the seeds' values as dots, one
  panel per metric, and the validation kNN curves (mean over seeds) per variant. The house
  style of `pcl_jax.plot`: a bare Agg figure, colours C0.., light grid."""
  variants = list(report['variants'])
  num_panels = len(METRICS) + 1
  num_columns = 4
  num_rows = math.ceil(num_panels / num_columns)
  figure = Figure(figsize=(4.2 * num_columns, 3.3 * num_rows), layout='constrained')
  FigureCanvasAgg(figure)
  axes = figure.subplots(num_rows, num_columns, squeeze=False).ravel()
  positions = np.arange(len(variants))
  for axis, (metric, _, _, _) in zip(axes, METRICS):
    for index, variant in enumerate(variants):
      entry = report['variants'][variant][metric]
      color = f'C{index % 10}'
      if entry['mean'] is not None:
        axis.bar(index, entry['mean'], color=color, alpha=0.6,
                 yerr=entry['ci95'] if entry['ci95'] is not None else None, capsize=4)
        seed_values = [v for v in entry['values'] if v is not None]
        axis.plot([index] * len(seed_values), seed_values, 'o', color='black', markersize=2.5)
    axis.set_title(metric)
    axis.set_xticks(positions)
    axis.set_xticklabels(variants, rotation=30, ha='right', fontsize='small')
    axis.grid(alpha=0.3, axis='y')
  curve_axis = axes[len(METRICS)]
  drawn = False
  for index, variant in enumerate(variants):
    curve = report.get('curves', {}).get(variant) or {}
    if curve.get('epochs'):
      curve_axis.plot(curve['epochs'], curve['mean'], color=f'C{index % 10}', marker='o',
                      markersize=3, label=variant)
      drawn = True
  _, title, ylabel = plot.VAL_PANEL
  curve_axis.set_title(f'{title} (mean over seeds)')
  curve_axis.set_xlabel('epoch')
  curve_axis.set_ylabel(ylabel)
  curve_axis.grid(alpha=0.3)
  if drawn:
    curve_axis.legend(fontsize='small')
  else:
    curve_axis.text(0.5, 0.5, 'no validation kNN\n(eval.val_every=0)', ha='center',
                    va='center', transform=curve_axis.transAxes)
  for axis in axes[num_panels:]:
    axis.set_visible(False)
  figure.suptitle(f"study {report['study'].get('name', '')}: mean ± 95% interval over seeds "
                  f"(dots: seeds); baseline {report['baseline']}")
  run_files.write_atomic(out, lambda handle: figure.savefig(handle, format='png', dpi=90),
                         binary=True)


def write_report(workdir: str, report: dict) -> List[str]:
  """Writes WORKDIR/report.json, report.md and report.png (each atomically); returns paths.

  report.json keeps the study's order of variants (keys are not sorted) and never holds NaN.
  """
  paths = [os.path.join(workdir, name) for name in REPORT_FILES]
  text = json.dumps(report, indent=2, allow_nan=False) + '\n'
  run_files.write_atomic(paths[0], lambda handle: handle.write(text))
  markdown = format_markdown(report)
  run_files.write_atomic(paths[1], lambda handle: handle.write(markdown))
  plot_report(report, paths[2])
  return paths
