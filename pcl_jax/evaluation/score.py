r"""Scores saved features with exactly what `--mode=eval` runs on the features it embeds.

This module owns the command line that reads `features_<split>.npz` files (arrays `features`
[N, D] and `labels` [N]: what `eval.save_features` writes, and what the PyTorch reference script
writes) of any model and scores them with `driver.evaluate_features`: kNN, linear probe,
few-shot episodes and clustering quality, into the results.json layout of `driver`. It never
embeds images and never reads checkpoints.

  python -m pcl_jax.evaluation.score --features=runs/digits/eval --config=configs/digits.py
  python -m pcl_jax.evaluation.score --features=/tmp/ref/features_train.npz,/tmp/ref/features_test.npz \
      --config=configs/digits.py --out=/tmp/ref/results.json

`--features` is one of:
- DIR: scores DIR/features_<data.eval_split>.npz, with DIR/features_<data.train_split>.npz as
  the kNN / probe references when that file exists (the splits are the config's);
- EVAL.npz: the eval features alone (kNN and the probe on within-eval halves);
- TRAIN.npz,EVAL.npz: the train split's features (references), then the eval split's.
As in `--mode=eval`, kNN and the probe go train -> eval when every eval class occurs in the
train file and the eval split is not part of the train split (split names: the config's for
DIR; else each file's `split` array, or its name features_<split>.npz); otherwise within-eval
halves. `--config` (default configs/default.py) supplies `eval.*` (knn_k, knn_t,
fewshot_episodes, fewshot_queries) and `clustering.*` (backend, niter, nredo, spherical,
use_float16); `--config.eval.knn_k=10` overrides a field. `--out` (default
scores_<split>.json beside the eval file; an existing file needs `--overwrite`) gets
results.json's layout, with `split`, `feature_layer`, `encoder` and `checkpoint_step` from the
eval file's arrays of those names when it has them (pcl_jax writes them; else the split from the
file name and null), and `features` naming the files scored. `assignments_<split>.csv` goes in
`--out`'s folder (`assignments.py`): the `path` column from the eval file's `paths` array when
it has one, its `level_<k>` columns when it names the run's `levels` (and `level_seed`) as
pcl_jax's files do (clustered with `--config`'s `clustering.*`: pass the run's config), and
`kmeans_<k>` with labels. A file without `labels` holds unlabelled features: the label metrics
are then null with `skipped: "no labels"` (driver). A missing file, a file without `features`,
a train file without labels for a labelled eval file, or mismatched shapes is one line
`error: ...` and exit status 2.
"""

import os
import re
import time
from typing import Optional, Tuple

from absl import app
from absl import flags
import numpy as np

from pcl_jax import clustering
from pcl_jax import configuration
from pcl_jax.configuration import UserError
from pcl_jax.evaluation import assignments
from pcl_jax.evaluation import driver
from pcl_jax.run import cli
from pcl_jax.run import files as run_files

_META_FIELDS = ('split', 'feature_layer', 'encoder', 'checkpoint_step', 'level_seed')


def _default_config_path() -> Optional[str]:
  try:
    from configs import default  # pylint: disable=g-import-not-at-top
  except ImportError:  # pcl_jax used outside the repository: --config is then required
    return None
  return default.__file__


def _split_of(path: str) -> str:
  """features_<split>.npz -> split; any other name -> its stem."""
  stem = os.path.basename(path)
  stem = stem[:-len('.npz')] if stem.endswith('.npz') else stem
  return stem[len('features_'):] if stem.startswith('features_') else stem


def load_features(path: str, what: str) -> Tuple[np.ndarray, Optional[np.ndarray], dict]:
  """(features [N, D] float32, labels [N] int64 or None, meta) of one npz file; UserError naming
  the file and what is wrong with it. A file without `labels` holds unlabelled features. `meta`
  holds the file's `_META_FIELDS` arrays as Python values, `split` (from the file name when the
  file has none), `paths` (a tuple of the image files, empty when the file has none) and
  `levels` (the run's final cluster counts, empty when the file has none)."""
  if not os.path.isfile(path):
    raise UserError(f'{what} {path}: no such file; pass features_<split>.npz files or the '
                    'directory holding them (eval.save_features=True writes them into '
                    'WORKDIR/eval)')
  try:
    with np.load(path, allow_pickle=False) as archive:
      arrays = {name: archive[name] for name in archive.files}
  except Exception as error:  # pylint: disable=broad-except
    raise UserError(f'{what} {path} is not a readable .npz file ({type(error).__name__}: '
                    f'{error})') from error
  if 'features' not in arrays:
    raise UserError(f"{what} {path} has no array 'features' (it holds "
                    f'{", ".join(sorted(arrays)) or "nothing"}); a features file holds '
                    '`features` [N, D] and, for labelled images, `labels` [N]')
  features, labels = arrays['features'], arrays.get('labels')
  if features.ndim != 2 or features.shape[0] < 1 or features.shape[1] < 1:
    raise UserError(f'{what} {path}: `features` has shape {features.shape}, expected [N, D]')
  for name in ('labels', 'paths'):
    if name in arrays and arrays[name].shape != (features.shape[0],):
      raise UserError(f'{what} {path}: `{name}` has shape {arrays[name].shape} but `features` '
                      f'has {features.shape[0]} rows; expected {name} [{features.shape[0]}]')
  if labels is not None and not np.issubdtype(labels.dtype, np.integer):
    raise UserError(f'{what} {path}: `labels` are {labels.dtype}, expected integer class ids')
  if not np.issubdtype(features.dtype, np.floating):
    raise UserError(f'{what} {path}: `features` are {features.dtype}, expected floats')
  if not np.isfinite(features).all():
    raise UserError(f'{what} {path}: `features` hold non-finite values (NaN or inf)')
  meta = {name: arrays[name].item() for name in _META_FIELDS
          if name in arrays and arrays[name].ndim == 0}
  meta.setdefault('split', _split_of(path))
  meta['paths'] = tuple(str(p) for p in arrays['paths']) if 'paths' in arrays else ()
  levels = arrays.get('levels')
  meta['levels'] = [int(k) for k in levels] if levels is not None and levels.ndim == 1 else []
  labels = None if labels is None else labels.astype(np.int64)
  return features.astype(np.float32), labels, meta


def resolve_paths(features_arg: str, config) -> Tuple[Optional[str], str, Optional[bool]]:
  """(train path or None, eval path, eval split part of the train split or None when the files'
  own split names decide) from `--features` (module docstring)."""
  parts = [part.strip() for part in str(features_arg).split(',') if part.strip()]
  if len(parts) == 1 and os.path.isdir(parts[0]):
    directory = parts[0]
    eval_path = driver.features_path(directory, config.data.eval_split)
    train_path = driver.features_path(directory, config.data.train_split)
    if not os.path.isfile(eval_path):
      found = sorted(name for name in os.listdir(directory) if re.match(r'features_.*\.npz$', name))
      raise UserError(f'--features={directory}: no {os.path.basename(eval_path)} (data.eval_split='
                      f'{config.data.eval_split!r}) there; it holds '
                      f'{", ".join(found) or "no features_<split>.npz"}: set '
                      '--config.data.eval_split, or pass TRAIN.npz,EVAL.npz')
    same_split = driver.eval_split_in_training(config)
    if same_split or not os.path.isfile(train_path):
      train_path = None
    return train_path, eval_path, same_split
  if len(parts) == 1:
    return None, parts[0], None
  if len(parts) == 2:
    return parts[0], parts[1], None
  raise UserError(f'--features={features_arg!r}: give a directory, EVAL.npz, or TRAIN.npz,EVAL.npz')


def score_features(config, features_arg: str, out: Optional[str] = None, *,
                   overwrite: bool = False, kmeans_fn=None) -> dict:
  """Scores the files named by `features_arg` (module docstring) and writes `out`.

  Returns:
    The results dict written (driver.py's layout).
  Raises:
    UserError: a missing or malformed file, mismatched dimensions, an existing `out` without
      `overwrite`.
  """
  start = time.perf_counter()
  train_path, eval_path, same_split = resolve_paths(features_arg, config)
  eval_features, eval_labels, meta = load_features(eval_path, 'eval features')
  out = out or assignments.split_file(os.path.dirname(os.path.abspath(eval_path)), 'scores',
                                      meta['split'], '.json')
  if os.path.exists(out) and not overwrite:
    raise UserError(f'--out={out} exists; pass --overwrite to replace it, or another --out')
  train_features = train_labels = None
  if train_path is not None and eval_labels is not None:
    train_features, train_labels, train_meta = load_features(train_path, 'train features')
    if train_labels is None:
      raise UserError(f'train features {train_path} have no `labels` but eval features '
                      f'{eval_path} have: kNN and the probe need labelled references; pass '
                      'the eval file alone (within-eval halves) or a labelled train file')
    if train_features.shape[1] != eval_features.shape[1]:
      raise UserError(f'train features {train_path} have dimension {train_features.shape[1]} '
                      f'but eval features {eval_path} have {eval_features.shape[1]}; score '
                      'features of one model')
    if same_split is None:
      same_split = (os.path.abspath(train_path) == os.path.abspath(eval_path)
                    or configuration.splits_overlap(train_meta['split'], meta['split']))
  load_s = time.perf_counter() - start

  # The run's levels (pcl_jax's own files name them) first, as --mode=eval writes them.
  level_seed = meta.get('level_seed')
  columns = {}
  if meta['levels'] and level_seed is not None:
    columns.update(assignments.level_assignments(config, eval_features, meta['levels'],
                                                 int(level_seed)))
  results = driver.evaluate_features(config, eval_features, eval_labels, train_features,
                                     train_labels, same_split=bool(same_split),
                                     kmeans_fn=kmeans_fn, assignments=columns,
                                     cluster_levels=meta['levels'] or None)
  results['timing_s'] = {'load': load_s, **results['timing_s']}
  results['timing_s']['total'] += load_s
  results.update(split=meta['split'], feature_layer=meta.get('feature_layer'),
                 checkpoint_step=meta.get('checkpoint_step'), encoder=meta.get('encoder'),
                 features={'eval': os.path.abspath(eval_path),
                           'train': train_path and os.path.abspath(train_path)})
  csv_path = assignments.csv_path(os.path.dirname(os.path.abspath(out)), meta['split'])
  assignments.write_csv(csv_path, columns, meta['paths'], eval_labels,
                        num_rows=eval_features.shape[0])
  results['assignments'] = assignments.describe(
      columns, {'assignments': os.path.basename(csv_path)}, meta['levels'], level_seed)
  run_files.write_json_atomic(out, results)
  print(driver.format_table(results), flush=True)
  print(f'results written to {out}', flush=True)
  return results


def _define_flags() -> None:
  """This command's flags, on absl's global FLAGS (as every entry point, pcl_jax/run/cli.py); defined
  only when the module runs as a program, so importing it as a library defines none."""
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file('config', _default_config_path(),
                                  'Config supplying eval.* and clustering.* (default '
                                  'configs/default.py).', lock_config=True)
  flags.DEFINE_string('features', None, 'DIR, EVAL.npz, or TRAIN.npz,EVAL.npz.')
  flags.DEFINE_string('out', None, 'Results JSON (default scores_<split>.json beside the eval '
                      'features).')
  flags.DEFINE_bool('overwrite', False, 'Replace an existing --out.')
  flags.DEFINE_bool('verbose', False, 'Show the Python traceback of user errors.')


def main(argv):
  """The command line (module docstring). Exit status 2 with one `error:` line on a mistake."""
  values = flags.FLAGS
  if len(argv) > 1:
    cli.fail(f'unexpected arguments {argv[1:]}; pass --features=...')
  if not values.features:
    cli.fail('--features is required: a directory of features_<split>.npz files, EVAL.npz, or '
             'TRAIN.npz,EVAL.npz')
  if values.config is None:
    cli.fail('--config is required outside the repository (no configs/default.py to default to)')
  cli.setup_logging(values.verbose)
  cli.limit_xla_threads(values.config)

  def run():
    configuration.validate(values.config)
    clustering.check_settings(values.config)
    score_features(values.config, values.features, values.out, overwrite=values.overwrite)

  cli.run_reporting_errors(run, values.verbose)


if __name__ == '__main__':
  _define_flags()
  app.run(main, flags_parser=cli.parse_flags)
