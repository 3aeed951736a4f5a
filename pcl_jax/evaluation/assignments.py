"""The clusters an evaluation keeps: the run's own levels, and `eval/assignments_<split>.csv`.

This module owns which clusterings of the evaluated features are kept and how they are written:
the run's final cluster-schedule levels (`final_levels`, from a checkpoint's meta), clustered
again on the evaluated features with the run's own `clustering.*` settings (`level_assignments`),
and the CSV of every clustering (`write_csv`). The evaluation's own k-means with k = classes
(`driver.evaluate_features`) and the clustering stage add their columns to the same dict. It
never scores a clustering and never draws one (`gallery`).

Columns, in this order: `index` (the row of `features_<split>.npz`), `path` when the images are
files, `label` when there are labels, then one per clustering in the dict's insertion order:
`level_<k>` for the run's levels, `kmeans_<k>` for the evaluation's k-means, `head` for the
clustering stage. Cluster ids are integers from 0.
"""

import csv
import io
import logging
import os
import re
from typing import Dict, Optional, Sequence

import numpy as np

from pcl_jax import cluster_schedule
from pcl_jax import clustering
from pcl_jax.evaluation import protocol
from pcl_jax.run import files as run_files


def level_column(k: int) -> str:
  return f'level_{int(k)}'


def kmeans_column(k: int) -> str:
  return f'kmeans_{int(k)}'


def final_levels(config, meta: dict) -> list:
  """The cluster counts of the run's schedule as its checkpoint left it (the levels its next
  E-step would cluster), in clustering order (descending under `clustering.levels=
  hierarchical`); the config's first levels when the meta holds no schedule."""
  if meta.get('schedule') is not None:
    active = cluster_schedule.ClusterSchedule.saved_active(meta['schedule'])
  else:
    active = cluster_schedule.ClusterSchedule.from_config(config.schedule).active
  if config.clustering.levels == 'hierarchical':
    return sorted(active, reverse=True)
  return active


def level_assignments(config, features, ks: Sequence[int], seed: int) -> Dict[str, np.ndarray]:
  """{`level_<k>`: im2cluster [N]} of the E-step's clustering (`clustering.cluster_levels` with
  the run's `clustering.*` settings, seeded `seed`) on `features`; levels with more clusters
  than features are left out, with a warning."""
  num = int(features.shape[0])
  kept = [int(k) for k in ks if int(k) <= num]
  if len(kept) < len(ks):
    logging.warning('assignments: levels %s have more clusters than the %d evaluated images; '
                    'left out', [k for k in ks if int(k) > num], num)
  if not kept:
    return {}
  levels = clustering.cluster_levels(features, kept, seed=seed,
                                     **clustering.level_settings(config))
  return {level_column(level['k']): np.asarray(level['im2cluster'], np.int64)
          for level in levels}


def describe(columns, files: dict, levels: Sequence[int] = (),
             level_seed: Optional[int] = None) -> dict:
  """results.json's `assignments` entry: the columns kept, the run's levels and their k-means
  seed, the seed of the kept `kmeans_<k>` run (`protocol.EVAL_SEED`, the first of the
  clustering-quality runs), and the files written."""
  has_kmeans = any(name.startswith('kmeans_') for name in columns)
  return {'columns': list(columns), 'levels': [int(k) for k in levels], 'level_seed': level_seed,
          'kmeans_seed': protocol.EVAL_SEED if has_kmeans else None, 'files': files}


def split_file(directory: str, prefix: str, split: str, suffix: str) -> str:
  """DIR/<prefix>_<split><suffix>, the split's characters outside [A-Za-z0-9_.+-] as '_'."""
  return os.path.join(directory, f"{prefix}_{re.sub(r'[^A-Za-z0-9_.+-]', '_', split)}{suffix}")


def csv_path(directory: str, split: str) -> str:
  """DIR/assignments_<split>.csv."""
  return split_file(directory, 'assignments', split, '.csv')


def csv_text(assignments: Dict[str, np.ndarray], paths: Sequence[str] = (),
             labels: Optional[np.ndarray] = None, num_rows: Optional[int] = None) -> str:
  """The CSV of the module docstring, as text. Every column must have one value per row."""
  columns = {name: np.asarray(values) for name, values in assignments.items()}
  num_rows = num_rows if num_rows is not None else len(next(iter(columns.values()), paths))
  if paths and len(paths) != num_rows:
    raise ValueError(f'{len(paths)} paths for {num_rows} rows')
  if labels is not None and len(labels) != num_rows:
    raise ValueError(f'{len(labels)} labels for {num_rows} rows')
  for name, values in columns.items():
    if values.shape != (num_rows,):
      raise ValueError(f'assignments {name!r} have shape {values.shape}, expected ({num_rows},)')
  header = ['index'] + (['path'] if paths else []) + (['label'] if labels is not None else [])
  header += list(columns)
  text = io.StringIO()
  writer = csv.writer(text, lineterminator='\n')
  writer.writerow(header)
  for row in range(num_rows):
    writer.writerow([row] + ([paths[row]] if paths else [])
                    + ([int(labels[row])] if labels is not None else [])
                    + [int(values[row]) for values in columns.values()])
  return text.getvalue()


def write_csv(path: str, assignments: Dict[str, np.ndarray], paths: Sequence[str] = (),
              labels: Optional[np.ndarray] = None, num_rows: Optional[int] = None) -> str:
  """Writes `csv_text` to `path` atomically; returns the path."""
  text = csv_text(assignments, paths, labels, num_rows)
  run_files.write_atomic(path, lambda handle: handle.write(text.encode('utf-8')), binary=True)
  return path
