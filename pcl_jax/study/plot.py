"""Training curves of one or more runs, from their `metrics.jsonl`.

Usage::

  python -m pcl_jax.plot WORKDIR [WORKDIR ...] --out curves.png

This module owns reading `DIR/metrics.jsonl` (one JSON object per epoch, DESIGN.md section 3) and
drawing it: loss_inst, loss_proto, acc_inst, acc_proto (and the validation kNN top-1 when any run
logged it) per epoch, one line per run, with dashed vertical markers at the epochs whose cluster
counts differ from the previous epoch's. It only reads workdirs and writes the one image; it
never touches checkpoints, configs or the training code, and it imports neither jax nor pyplot.
"""

import argparse
import json
import os
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

METRICS_FILE = 'metrics.jsonl'

# (record key, panel title, y-axis label), in panel order.
PANELS = (
    ('loss_inst', 'InfoNCE loss', 'loss'),
    ('loss_proto', 'ProtoNCE loss', 'loss'),
    ('acc_inst', 'instance accuracy', 'top-1 (%)'),
    ('acc_proto', 'prototype accuracy', 'top-1 (%)'),
)
VAL_PANEL = ('val_knn_top1', 'validation kNN', 'top-1 (%)')


class MetricsError(ValueError):
  """A workdir's metrics.jsonl is missing, empty or malformed."""


def load_metrics(workdir: str) -> List[Dict[str, Any]]:
  """Reads `workdir/metrics.jsonl`: one record per epoch, sorted by epoch.

  A resumed run re-logs the epochs after its last checkpoint, so when an epoch appears twice the
  later record wins. A truncated last line (a run killed mid-write, or still writing) is skipped.

  Raises:
    MetricsError: the file is missing, has no records, or has a malformed line other than the
      last, or a record without an integer `epoch`.
  """
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.isfile(path):
    raise MetricsError(f'{path} not found; pass a training workdir (the --workdir of a run)')
  with open(path) as f:
    lines = [(number, line) for number, line in enumerate(f, start=1) if line.strip()]
  by_epoch = {}
  for position, (number, line) in enumerate(lines):
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      if position == len(lines) - 1:
        print(f'warning: {path}:{number}: skipping truncated last line', file=sys.stderr)
        continue
      raise MetricsError(f'{path}:{number}: not a JSON object ({e.msg})') from None
    if not isinstance(record, dict) or not isinstance(record.get('epoch'), int):
      raise MetricsError(f'{path}:{number}: expected a JSON object with an integer "epoch"')
    by_epoch[record['epoch']] = record
  if not by_epoch:
    raise MetricsError(f'{path} holds no epoch records; has the run finished an epoch?')
  return [by_epoch[epoch] for epoch in sorted(by_epoch)]


def cluster_change_epochs(records: Sequence[Dict[str, Any]]) -> List[int]:
  """Epochs whose `num_clusters` differs from the previous record's.

  The start of clustering (null -> list, at the end of warm-up) is not a change of cluster
  counts, so only transitions between two logged lists count.
  """
  epochs = []
  previous = None
  for record in records:
    current = record.get('num_clusters')
    if current is not None and previous is not None and list(current) != list(previous):
      epochs.append(record['epoch'])
    if current is not None:
      previous = current
  return epochs


def _series(records: Sequence[Dict[str, Any]], key: str) -> Tuple[List[int], List[float]]:
  """(epochs, values) of the records where `key` is logged and not null."""
  points = [(r['epoch'], float(r[key])) for r in records if r.get(key) is not None]
  return [p[0] for p in points], [p[1] for p in points]


def _has_validation(runs: Sequence[Tuple[str, Sequence[Dict[str, Any]]]]) -> bool:
  return any(r.get(VAL_PANEL[0]) is not None for _, records in runs for r in records)


def plot_runs(runs: Sequence[Tuple[str, Sequence[Dict[str, Any]]]], out: str) -> None:
  """Draws the runs' curves into the PNG `out` (parent directories are created).

  Args:
    runs: (label, records) per run, records as returned by `load_metrics`.
    out: output image path.
  """
  panels = PANELS + ((VAL_PANEL,) if _has_validation(runs) else ())
  num_columns = 3 if len(panels) > 4 else 2
  # A bare Figure with the Agg canvas instead of pyplot: no global backend switch, no global
  # figure registry, so importing this module from a notebook or a test changes nothing.
  figure = Figure(figsize=(5.5 * num_columns, 8), layout='constrained')
  FigureCanvasAgg(figure)
  axes = figure.subplots(2, num_columns, squeeze=False).ravel()
  for axis, (key, title, ylabel) in zip(axes, panels):
    for index, (label, records) in enumerate(runs):
      color = f'C{index % 10}'
      epochs, values = _series(records, key)
      # Validation is logged every few epochs only: markers keep isolated points visible.
      marker = 'o' if key == VAL_PANEL[0] else None
      axis.plot(epochs, values, color=color, marker=marker, markersize=3, label=label)
      for epoch in cluster_change_epochs(records):
        axis.axvline(epoch, color=color, linestyle='--', linewidth=0.8, alpha=0.6)
    axis.set_title(title)
    axis.set_xlabel('epoch')
    axis.set_ylabel(ylabel)
    axis.grid(alpha=0.3)
  for axis in axes[len(panels):]:
    axis.set_visible(False)
  axes[0].legend(title='dashed: cluster change', fontsize='small')
  directory = os.path.dirname(os.path.abspath(out))
  os.makedirs(directory, exist_ok=True)
  figure.savefig(out, dpi=100)


def run_labels(workdirs: Sequence[str]) -> List[str]:
  """Each run's label: its directory name, or the path as given when two names collide."""
  names = [os.path.basename(os.path.normpath(d)) for d in workdirs]
  return [name if names.count(name) == 1 else d for name, d in zip(names, workdirs)]


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m pcl_jax.plot',
      description='Plot training curves from the metrics.jsonl of one or more workdirs.')
  parser.add_argument('workdirs', nargs='+', metavar='DIR', help='training workdirs')
  parser.add_argument('--out', default=None,
                      help='output PNG (default: DIR/metrics.png of the first DIR)')
  args = parser.parse_args(argv)
  try:
    runs = [(label, load_metrics(d))
            for label, d in zip(run_labels(args.workdirs), args.workdirs)]
  except MetricsError as e:
    parser.error(str(e))  # prints usage and the message, exits with status 2
  out = args.out or os.path.join(args.workdirs[0], 'metrics.png')
  plot_runs(runs, out)
  print(f'wrote {out}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
