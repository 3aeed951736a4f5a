r"""Downstream evaluation of a checkpoint: kNN, linear probe, few-shot episodes, clustering quality.

This module owns `--mode=eval` (restore an encoder from an Orbax checkpoint without building an
optimizer, embed the data under the eval transform, score the features, write
`WORKDIR/eval/results_<split>.json` and, as the last evaluation, `results.json`, the
clusterings it kept (`assignments_<split>.csv`, a gallery per level); with
`eval.save_features` also `features_<split>.npz`); the metrics
themselves live beside it (`knn`, `linear_probe`, `fewshot`, `clustering_quality`, and
`protocol` for reference/query sets). It never trains the encoder, never writes checkpoints and
never touches metrics.jsonl. The array work on features (kNN, the few-shot classifiers, both
logistic regressions) is jitted and batched and runs on CPU and GPU; index and label bookkeeping
runs on the host, vectorised (episode sampling in numpy, NMI/AMI/ARI via sklearn, the Hungarian
matching via scipy), as does k-means' driver (pcl_jax.clustering).

  python -m pcl_jax.main --config=configs/digits.py --workdir=/tmp/pcl_digits --mode=eval

Protocols (all randomness below uses the fixed `EVAL_SEED`, not `config.seed`, so every run and
every checkpoint is scored on the same episodes and splits):
- Features: the momentum (key) encoder in eval mode (BN running statistics), as the reference's
  feature pass (`eval.encoder=query`: the query encoder, as salesforce/PCL's own transfer
  evaluations), `eval.feature_layer` (`head`: the L2-normalised embedding; `backbone`: the
  L2-normalised pooled backbone features), under the eval transform (`data.eval_resize`).
  `pcl_jax.evaluation.score` scores saved features (`eval.save_features`, or any model's) with
  `evaluate_features`, the same code.
- Reference/query sets of kNN and the linear probe. When every class of `data.eval_split` occurs
  in `data.train_split` (digits), the reference is the train split and the queries are the eval
  split (`protocol: "train_to_eval"`). When the eval classes are not all in the train split
  (mini-ImageNet `test`, 20 classes disjoint from `train`) or the eval split is part of the train
  split (the same split, or `test` within `train+val+test`: every query would find itself), the
  eval split is cut per class into halves (`n // 2` reference, the rest queries;
  `"eval_halves"`) and the train split is never embedded.
- kNN: weighted cosine kNN (InstDisc / solo-learn): the `eval.knn_k` most similar references vote
  for their class with weight `exp(cos / eval.knn_t)`; top-1 in percent.
- Linear probe: multinomial logistic regression (optax Adam, full batch, `PROBE_STEPS` steps,
  L2 `PROBE_WEIGHT_DECAY`) on the reference features standardised with their own mean/std; the
  learning rate is picked from `PROBE_LEARNING_RATES` by top-1 on a held-out 20% of the reference
  set, and the model trained with it on the other 80% is scored on the queries.
- Few-shot: `FEWSHOT_SETTINGS` N-way K-shot episodes on the eval split, `eval.fewshot_queries`
  queries per class, `eval.fewshot_episodes` episodes, classes with fewer than K + queries images
  never drawn. Two classifiers on the L2-normalised features of each episode:
  nearest centroid (squared Euclidean distance to the class mean of the support features) and
  logistic regression with sklearn's `LogisticRegression()` objective (multinomial, intercept,
  L2 penalty 1/(2C)*||W||^2 with C = `FEWSHOT_LOGREG_C`, summed cross-entropy; the "RFS" few-shot
  protocol), solved by `FEWSHOT_LOGREG_STEPS` steps of Nesterov-accelerated gradient descent with
  step 1/L (L the Lipschitz bound of the gradient) in the span of the support features.
  Accuracy per episode over its N * queries; mean over episodes and 95% interval
  1.96 * std / sqrt(episodes) (population std), in percent.
- Clustering quality: `clustering.kmeans` (the project backend `clustering.backend`) with
  k = number of classes of the eval split, the evaluation's own settings (L2, or spherical with
  `eval.kmeans_spherical`; `KMEANS_NITER` iterations, best of `KMEANS_NREDO` restarts per run;
  never the run's `clustering.*`, so runs trained with different E-steps are scored alike), run
  `eval.kmeans_runs` times with seeds EVAL_SEED, EVAL_SEED + 1, ...; NMI (arithmetic
  normalisation), AMI and ARI as sklearn.metrics compute them (fractions in [0, 1]) and the
  accuracy of the best one-to-one cluster-to-class matching (Hungarian, in percent), each the
  mean over the runs, with the NMI's standard deviation over the runs (`nmi_sd`).
- Cluster head (`eval.cluster_head`): `cluster_head.cluster_head_results`, SCAN's clustering
  step on the frozen features, fitted on the eval split's features together with the train
  split's when those are other images of the same classes, scored on the eval split like
  k-means; k = the eval split's classes, or without labels `eval.cluster_head_k` (0: the run's
  coarsest final cluster level).

results.json (DESIGN.md section 3 keys first; accuracies in percent, NMI/AMI/ARI in [0, 1];
entries that could not be computed are null with a `skipped` reason):
  {
    "knn_top1": float, "linear_top1": float,
    "fewshot": {
      "5way1shot": {"mean": float, "ci95": float, "episodes": int,   # nearest centroid
                    "ways": 5, "shots": 1, "queries": int,
                    "logreg": {"mean": float, "ci95": float}},     # logistic regression
      "5way5shot": {... same ...}},
    "clustering": {"k": int, "nmi": float, "ami": float, "ari": float, "acc": float,  # means
                   "runs": int, "spherical": bool, "nmi_sd": float, "nmi_runs": [float],
                   "backend": str},
    "cluster_head": {"k": int, "nmi", "ami", "ari", "acc": float or null, "method": "scan",
                     "num_fit": int, "neighbours": int, "entropy_weight": float,
                     "heads": int, "loss": float},     # with eval.cluster_head only
    "split": str, "checkpoint_step": int,
    "protocol": "train_to_eval" | "eval_halves",
    "knn": {"k": int, "temperature": float, "num_reference": int, "num_query": int},
    "linear_probe": {"lr": float, "holdout_top1": {lr_string: float}, "steps": int},
    "num_images": int, "feature_dim": int, "feature_layer": str, "encoder": str,
    "assignments": {"columns": [str], "levels": [int], "level_seed": int,
                    "kmeans_seed": int | null, "files": {what: file name in eval/}},
    "timing_s": {"features": float, "knn": float, "linear_probe": float, "fewshot": float,
                 "clustering": float, "cluster_head": float, "assignments": float,
                 "total": float}
  }
Without labels (an unlabelled image folder, or saved features without `labels`), `knn_top1`,
`linear_top1`, the few-shot means and the clustering metrics are null, and `knn`,
`linear_probe`, each few-shot entry and `clustering` carry `"skipped": "no labels"`;
`protocol` is null.

Clusterings kept (`assignments`, `gallery`): every evaluation writes
`eval/assignments_<split>.csv`, its columns the run's final cluster-schedule levels
(`level_<k>`: the E-step's clustering with the run's `clustering.*`, seeded `level_seed` =
seed * 1000 + epochs done, on the evaluated features), then what `evaluate_features` computed
(`kmeans_<k>`: the clustering-quality run of seed `EVAL_SEED`, with labels), and a gallery PNG
per level, `eval/gallery_<split>_level_<k>.png`.
"""

import json
import logging
import os
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pcl_jax import clustering
from pcl_jax import configuration
from pcl_jax.configuration import UserError
from pcl_jax.data import loaders
from pcl_jax.evaluation import assignments as assignments_lib
from pcl_jax.evaluation import cluster_head
from pcl_jax.evaluation import clustering_quality
from pcl_jax.evaluation import fewshot
from pcl_jax.evaluation import gallery
from pcl_jax.evaluation import knn
from pcl_jax.evaluation import linear_probe
from pcl_jax.evaluation import protocol
from pcl_jax import features as features_lib
from pcl_jax import models
from pcl_jax.run import checkpoint as checkpoint_lib
from pcl_jax.run import files as run_files


def _timed(timing: dict, name: str, fn, *args, **kwargs):
  start = time.perf_counter()
  result = fn(*args, **kwargs)
  jax.block_until_ready(result)
  timing[name] = time.perf_counter() - start
  return result


NO_LABELS = 'no labels'


def _fewshot_skipped(config, ways: int, shots: int, reason: str) -> dict:
  return {'mean': None, 'ci95': None, 'episodes': 0, 'ways': ways, 'shots': shots,
          'queries': config.eval.fewshot_queries, 'logreg': {'mean': None, 'ci95': None},
          'skipped': reason}


def _unlabelled_results(config, eval_features) -> dict:
  """results.json for features without labels: every label metric null, `skipped: "no labels"`."""
  return {
      'protocol': None, 'num_images': int(eval_features.shape[0]),
      'feature_dim': int(eval_features.shape[1]),
      'knn_top1': None, 'linear_top1': None,
      'knn': {'k': int(config.eval.knn_k), 'temperature': float(config.eval.knn_t),
              'num_reference': 0, 'num_query': 0, 'skipped': NO_LABELS},
      'linear_probe': {'lr': None, 'skipped': NO_LABELS},
      'fewshot': {f'{ways}way{shots}shot': _fewshot_skipped(config, ways, shots, NO_LABELS)
                  for ways, shots in fewshot.FEWSHOT_SETTINGS},
      'clustering': {'k': None, 'nmi': None, 'ami': None, 'ari': None, 'acc': None,
                     'skipped': NO_LABELS},
      'timing_s': {}}


def evaluate_features(config, eval_features, eval_labels, train_features=None,
                      train_labels=None, *, same_split: bool = False,
                      kmeans_fn: Optional[Callable] = None,
                      assignments: Optional[dict] = None,
                      cluster_levels: Optional[Sequence[int]] = None) -> dict:
  """Every metric of results.json from features (no checkpoint, no files).

  Args:
    config: the run config (sections `eval` and `clustering` are read).
    eval_features: [N, D] features of the eval split; eval_labels: [N], or None for unlabelled
      features (every label metric is then null with `skipped: "no labels"`).
    train_features, train_labels: the train split, or None (then within-eval halves).
    same_split: the two splits are the same images (forces within-eval halves).
    kmeans_fn: k-means override (default `pcl_jax.clustering.kmeans`).
    assignments: a dict to receive the clusterings computed, `{column name: int array [N]}` in
      the order computed (`assignments.py`'s columns): with labels `kmeans_<k>`, the first of
      the clustering-quality k-means runs (seed `protocol.EVAL_SEED`); `head`, the clustering
      stage's (`eval.cluster_head`).
    cluster_levels: the run's final cluster levels (the checkpoint's schedule), or None (the
      config schedule's first levels); the cluster head's k without labels defaults to their
      coarsest.
  Returns:
    The results dict of the module docstring without `split` and `checkpoint_step`.
  """
  timing = {}
  start = time.perf_counter()
  eval_features = jnp.asarray(eval_features, jnp.float32)
  if eval_labels is None:
    results = _unlabelled_results(config, eval_features)
  else:
    eval_labels = np.asarray(eval_labels)
    results = _label_metrics(config, eval_features, eval_labels, train_features, train_labels,
                             same_split, kmeans_fn, assignments, timing)
  if config.eval.cluster_head:
    k = cluster_head_k(config, eval_labels, eval_features.shape[0], cluster_levels)
    extra = head_extra_features(train_features, train_labels, eval_labels, same_split)
    results['cluster_head'], head_assignments = _timed(
        timing, 'cluster_head', cluster_head.cluster_head_results, eval_features, eval_labels, k,
        extra)
    if assignments is not None:
      assignments['head'] = head_assignments
  timing['total'] = time.perf_counter() - start
  results['timing_s'] = timing
  return results


def _label_metrics(config, eval_features, eval_labels, train_features, train_labels,
                   same_split: bool, kmeans_fn, assignments: Optional[dict],
                   timing: dict) -> dict:
  """kNN, the linear probe, few-shot and clustering quality of labelled features
  (`evaluate_features`), each one's time in `timing`."""
  protocol_name, ref_f, ref_l, query_f, query_l = protocol.reference_and_queries(
      eval_features, eval_labels, train_features, train_labels, same_split=same_split)
  _, ref_y, query_y = protocol.dense_labels(ref_l, query_l)
  results = {'protocol': protocol_name, 'num_images': int(eval_labels.size),
             'feature_dim': int(eval_features.shape[1])}

  results['knn_top1'] = _timed(timing, 'knn', knn.knn_top1, ref_f, ref_y, query_f, query_y,
                               k=config.eval.knn_k, temperature=config.eval.knn_t)
  results['knn'] = {'k': int(config.eval.knn_k), 'temperature': float(config.eval.knn_t),
                    'num_reference': int(ref_y.size), 'num_query': int(query_y.size)}

  probe = _timed(timing, 'linear_probe', linear_probe.linear_probe, ref_f, ref_y, query_f, query_y)
  results['linear_top1'] = probe.pop('top1')
  results['linear_probe'] = probe

  def all_fewshot():
    scores = {}
    for ways, shots in fewshot.FEWSHOT_SETTINGS:
      name = f'{ways}way{shots}shot'
      try:
        scores[name] = fewshot.fewshot_eval(eval_features, eval_labels, ways=ways, shots=shots,
                                            queries=config.eval.fewshot_queries,
                                            episodes=config.eval.fewshot_episodes)
      except ValueError as error:
        logging.warning('few-shot %s skipped: %s', name, error)
        scores[name] = _fewshot_skipped(config, ways, shots, str(error))
    return scores

  results['fewshot'] = _timed(timing, 'fewshot', all_fewshot)
  results['clustering'], first_run = _timed(
      timing, 'clustering', clustering_quality.clustering_quality, eval_features, eval_labels,
      runs=config.eval.kmeans_runs, spherical=config.eval.kmeans_spherical,
      backend=config.clustering.backend, use_float16=config.clustering.use_float16,
      kmeans_fn=kmeans_fn, return_assignments=True)
  results['clustering']['backend'] = config.clustering.backend
  if assignments is not None:
    assignments[assignments_lib.kmeans_column(results['clustering']['k'])] = first_run
  return results


def cluster_head_k(config, eval_labels, num_images: int,
                   cluster_levels: Optional[Sequence[int]] = None) -> int:
  """The cluster head's k: the eval split's class count when it has labels, else
  `eval.cluster_head_k`, 0 meaning the coarsest of `cluster_levels` (default the config
  schedule's first levels). UserError when the split has fewer images than k."""
  if eval_labels is not None:
    k = int(np.unique(np.asarray(eval_labels)).size)
  elif config.eval.cluster_head_k:
    k = int(config.eval.cluster_head_k)
  else:
    k = int(min(cluster_levels or assignments_lib.final_levels(config, {})))
  if num_images < k:
    raise UserError(f'eval.cluster_head: the eval split has {num_images} images, fewer than its '
                    f'k={k} clusters; set --config.eval.cluster_head_k to at most {num_images}, '
                    'or --config.eval.cluster_head=False')
  return k


def head_extra_features(train_features, train_labels, eval_labels, same_split: bool):
  """The train split's features when the cluster head may fit on them beside the eval split's
  (other images, of the same classes when both have labels: more neighbours per class), else
  None."""
  if train_features is None or same_split:
    return None
  if (train_labels is not None and eval_labels is not None
      and not protocol.shares_classes(train_labels, eval_labels)):
    return None
  return train_features


# ----------------------------------------------------------------------------------------------
# From a checkpoint.


def _fmt(value, digits: int = 2, suffix: str = '') -> str:
  return 'n/a' if value is None else f'{value:.{digits}f}{suffix}'


def format_table(results: dict) -> str:
  """A readable summary of a results dict (printed by `evaluate_checkpoint`)."""
  knn, clusters = results['knn'], results['clustering']
  if clusters.get('skipped') == NO_LABELS:
    rows = [('kNN, linear probe, few-shot, clustering quality', f'skipped: {NO_LABELS}')]
  else:
    rows = _labelled_rows(results)
  rows += _cluster_head_rows(results)
  for name, path in results.get('assignments', {}).get('files', {}).items():
    rows.append((name, path))
  step = results.get('checkpoint_step')
  reference = (f", kNN/probe {results['protocol']} ({knn['num_reference']} reference, "
               f"{knn['num_query']} queries)" if results['protocol'] else ', no labels')
  header = (f"eval of {'saved features' if step is None else f'checkpoint {step}'} on split "
            f"{results.get('split')!r}: {results['num_images']} images, D={results['feature_dim']}"
            f"{reference}")
  width = max(len(name) for name, _ in rows)
  lines = [header, '-' * len(header)] + [f'{name:<{width}}  {value}' for name, value in rows]
  timing = results.get('timing_s', {})
  if timing:
    lines.append('time: ' + ', '.join(f'{name} {seconds:.1f}s' for name, seconds in
                                      timing.items()))
  return '\n'.join(lines)


def _labelled_rows(results: dict) -> list:
  knn, probe, clusters = results['knn'], results['linear_probe'], results['clustering']
  rows = [
      (f"kNN top-1 (k={knn['k']}, T={knn['temperature']:g})", _fmt(results['knn_top1'],
                                                                    suffix=' %')),
      (f"linear probe top-1 (lr={probe['lr']:g})", _fmt(results['linear_top1'], suffix=' %')),
  ]
  for name, entry in results['fewshot'].items():
    setting = f"{entry['ways']}-way {entry['shots']}-shot"
    if entry['mean'] is None:
      rows.append((setting, f"skipped: {entry.get('skipped', '')}"))
      continue
    rows.append((f'{setting} nearest centroid', f"{entry['mean']:.2f} +- {entry['ci95']:.2f} %"))
    rows.append((f'{setting} logistic regression',
                 f"{entry['logreg']['mean']:.2f} +- {entry['logreg']['ci95']:.2f} %"))
  rows += [(f"k-means k={clusters['k']} NMI / AMI / ARI (mean of {clusters.get('runs', 1)})",
            f"{clusters['nmi']:.3f} / {clusters['ami']:.3f} / {clusters['ari']:.3f}"),
           (f"k-means k={clusters['k']} Hungarian acc", _fmt(clusters['acc'], suffix=' %'))]
  return rows


def _cluster_head_rows(results: dict) -> list:
  head = results.get('cluster_head')
  if head is None:
    return []
  name = f"cluster head ({head['method']}) k={head['k']}"
  if head['nmi'] is None:
    return [(name, f"skipped: {head.get('skipped', '')}")]
  return [(f'{name} NMI / AMI / ARI', f"{head['nmi']:.3f} / {head['ami']:.3f} / {head['ari']:.3f}"),
          (f'{name} Hungarian acc', _fmt(head['acc'], suffix=' %'))]


def results_path(workdir: str, split: Optional[str] = None) -> str:
  """WORKDIR/eval/results.json (the last evaluation), or results_<split>.json (that split's)."""
  if split is None:
    return os.path.join(workdir, 'eval', 'results.json')
  return assignments_lib.split_file(os.path.join(workdir, 'eval'), 'results', split, '.json')


def _check_results_writable(workdir: str, split: str, overwrite: bool) -> None:
  """Before an evaluation of `split`: nothing already written may be lost.

  results.json (the last evaluation) is replaced by every evaluation, so one whose split has no
  results_<split>.json of its own (a run directory from before those files) is first copied
  there. UserError, unless `overwrite`, when `split` was evaluated before or when results.json
  cannot be kept that way (unreadable, or no split recorded).
  """
  last = results_path(workdir)
  if os.path.exists(last):
    try:
      with open(last) as handle:
        last_split = json.load(handle).get('split')
    except (OSError, ValueError, AttributeError):
      last_split = None
    if last_split is None:
      if not overwrite:
        raise UserError(f'{last} exists and records no split, so it cannot be kept beside the new '
                        'results; pass --overwrite to replace it')
    elif not os.path.exists(results_path(workdir, last_split)):
      with open(last, 'rb') as handle:
        kept = handle.read()
      run_files.write_atomic(results_path(workdir, last_split), lambda tmp: tmp.write(kept),
                             binary=True)
  own = results_path(workdir, split)
  if os.path.exists(own) and not overwrite:
    raise UserError(f'{own} exists (split {split!r} was evaluated before); pass --overwrite to '
                    'replace it, or evaluate another split with --config.data.eval_split')


def eval_split_in_training(config, split: Optional[str] = None) -> bool:
  """Whether the eval split's images are among `data.train_split`'s (the same split, or one of
  its '+'-joined parts, e.g. test of train+val+test): kNN and the probe then use within-eval
  halves, never the training split as references (each query would find itself there)."""
  return configuration.splits_overlap(config.data.train_split, split or config.data.eval_split)


def evaluate_variables(config, variables, *, kmeans_fn: Optional[Callable] = None,
                       assignments: Optional[dict] = None,
                       cluster_levels: Optional[Sequence[int]] = None):
  """Embeds the eval (and, for shared classes, train) split with `variables` and scores them.

  Args:
    config: the run config (data, model, eval, clustering sections).
    variables: {'params', 'batch_stats'} of the encoder (the key or query encoder of a
      checkpoint, `eval.encoder`, or a fresh initialisation for a baseline).
    kmeans_fn: k-means override (default `pcl_jax.clustering.kmeans`).
    assignments, cluster_levels: passed to `evaluate_features`.
  Returns:
    (results without `checkpoint_step`, {split: (features [N, D] device array, labels [N] or
    None, its ArraySource)} of the eval split and, when it was embedded, the train split).
  """
  start = time.perf_counter()
  model = models.encoder_from_config(config)
  embed_fn = features_lib.make_embed_fn(model, config.eval.feature_layer)
  batch_size, workers = config.train.batch_size, config.data.num_workers
  split = config.data.eval_split
  eval_dataset = loaders.build_eval_dataset(config, split)
  eval_features, eval_labels = features_lib.extract_features(embed_fn, variables, eval_dataset,
                                                             batch_size, workers)
  # Embed the train split only when kNN / the probe go train -> eval (shared classes).
  same_split = eval_split_in_training(config, split)
  train_features = train_labels = train_dataset = None
  if not same_split and eval_labels is not None:
    train_dataset = loaders.build_eval_dataset(config, config.data.train_split)
    source_labels = getattr(getattr(train_dataset, 'source', None), 'labels', None)
    if source_labels is None or protocol.shares_classes(source_labels, eval_labels):
      train_features, train_labels = features_lib.extract_features(
          embed_fn, variables, train_dataset, batch_size, workers)
  jax.block_until_ready((eval_features, train_features))
  feature_s = time.perf_counter() - start

  results = evaluate_features(config, eval_features, eval_labels, train_features, train_labels,
                              same_split=same_split, kmeans_fn=kmeans_fn,
                              assignments=assignments, cluster_levels=cluster_levels)
  results['timing_s'] = {'features': feature_s, **results['timing_s']}
  results['timing_s']['total'] += feature_s
  results.update(split=split, feature_layer=config.eval.feature_layer)
  embedded = {split: (eval_features, eval_labels, eval_dataset.source)}
  if train_features is not None:
    embedded[config.data.train_split] = (train_features, train_labels, train_dataset.source)
  return results, embedded


def keep_clusters(directory: str, split: str, assignments: dict, features, labels,
                  source) -> dict:
  """Writes what the evaluation keeps of its clusterings of `split`: `assignments_<split>.csv`
  (every column of `assignments`, with the images' paths and labels) and a gallery PNG per
  `level_<k>` column. Returns {what: file name in `directory`}."""
  written = {'assignments': os.path.basename(assignments_lib.write_csv(
      assignments_lib.csv_path(directory, split), assignments, source.paths, labels,
      num_rows=int(features.shape[0])))}
  host_features = np.asarray(features)
  for column, im2cluster in assignments.items():
    if column.startswith('level_'):
      title = f'split {split!r}, {column}: each cluster, by size, its images nearest its centroid'
      path = gallery.write_gallery(gallery.gallery_path(directory, split, column), source.images,
                                   im2cluster, host_features, title)
      written[f'gallery {column}'] = os.path.basename(path)
  return written


def features_path(directory: str, split: str) -> str:
  """DIR/features_<split>.npz (`eval.save_features`; `pcl_jax.evaluation.score` reads it)."""
  return assignments_lib.split_file(directory, 'features', split, '.npz')


def save_features(directory: str, split: str, features, labels, paths=(), **meta) -> str:
  """Writes features_<split>.npz: `features` [N, D] float32 and `labels` [N] (what the PyTorch
  reference script writes too; no `labels` for unlabelled images), `paths` [N] (the image files,
  when the images are files), plus `split` and `meta` (e.g. feature_layer, encoder,
  checkpoint_step, level_seed as 0-d arrays; levels, the run's final cluster counts, 1-d) that
  `score` reads back. Atomic. Returns the path."""
  arrays = dict(features=np.asarray(features, np.float32), split=np.asarray(split))
  if labels is not None:
    arrays['labels'] = np.asarray(labels)
  if len(paths):
    arrays['paths'] = np.asarray(paths, dtype=str)
  arrays.update({name: np.asarray(value) for name, value in meta.items()})
  path = features_path(directory, split)
  run_files.write_atomic(path, lambda tmp: np.savez(tmp, **arrays), binary=True)
  return path


def encoder_variables(tree: dict, encoder: str) -> dict:
  """{'params', 'batch_stats'} of a restored checkpoint's key (momentum) or query encoder
  (`eval.encoder`)."""
  if encoder == 'query':
    return {'params': tree['params'], 'batch_stats': tree['batch_stats']}
  return {'params': tree['key_params'], 'batch_stats': tree['key_batch_stats']}


def evaluate_checkpoint(config, workdir: str, epochs_done: Optional[int] = None, *,
                        overwrite: bool = False, best: bool = False,
                        kmeans_fn: Optional[Callable] = None) -> dict:
  """`--mode=eval`: restores a checkpoint's encoder (`eval.encoder`), scores it, writes
  WORKDIR/eval/ (and with `eval.save_features` the features of every split it embedded,
  `save_features`).

  No optimizer or training state is built: the raw saved tree is restored and only the
  evaluated encoder's parameters and BN statistics are used.

  Args:
    config: the run config; its `model` must match the checkpoint's.
    workdir: the run directory (WORKDIR/checkpoints is read).
    epochs_done: the checkpoint (epochs done) to evaluate; default the latest.
    overwrite: replace an existing WORKDIR/eval/results_<split>.json (otherwise UserError).
    best: evaluate the best-by-validation checkpoint (WORKDIR/checkpoints_best).
    kmeans_fn: k-means override (default `pcl_jax.clustering.kmeans`).
  Returns:
    The results dict written to results_<split>.json and results.json (also printed as a
    table).
  Raises:
    FileNotFoundError: no (such) checkpoint. UserError: config/checkpoint mismatch,
    or the split's results exist and overwrite is False.
  """
  configuration.validate(config)
  clustering.check_settings(config)
  _check_results_writable(workdir, config.data.eval_split, overwrite)
  tree, meta, step = checkpoint_lib.restore_for_eval(workdir, epochs_done, best=best)
  checkpoint_path = os.path.join(checkpoint_lib.checkpoint_dir(workdir, best), str(step))
  checkpoint_lib.check_model_matches(config, meta, checkpoint_path)
  if meta.get('image_size') not in (None, config.data.image_size):
    logging.warning('evaluating at data.image_size=%s but the checkpoint was trained at %s',
                    config.data.image_size, meta['image_size'])

  variables = encoder_variables(tree, config.eval.encoder)
  computed = {}
  levels = assignments_lib.final_levels(config, meta)
  results, embedded = evaluate_variables(config, variables, kmeans_fn=kmeans_fn,
                                         assignments=computed, cluster_levels=levels)
  results['checkpoint_step'] = int(step)
  results['encoder'] = config.eval.encoder
  eval_dir = os.path.join(workdir, 'eval')
  split = results['split']
  features, labels, source = embedded[split]
  # The run's own levels first, then what evaluate_features computed (kmeans_<k>, head).
  start = time.perf_counter()
  level_seed = config.seed * 1000 + int(meta.get('epochs_done', step))
  columns = {**assignments_lib.level_assignments(config, features, levels, level_seed),
             **computed}
  results['assignments'] = assignments_lib.describe(
      columns, keep_clusters(eval_dir, split, columns, features, labels, source), levels,
      level_seed)
  timing = results['timing_s']
  timing['assignments'] = time.perf_counter() - start
  timing['total'] = timing.pop('total') + timing['assignments']  # the total last
  if config.eval.save_features:
    for name, (features, labels, source) in embedded.items():
      save_features(eval_dir, name, features, labels, source.paths,
                    feature_layer=config.eval.feature_layer, encoder=config.eval.encoder,
                    checkpoint_step=int(step), levels=np.asarray(levels, np.int64),
                    level_seed=level_seed)
  for path in (results_path(workdir, results['split']), results_path(workdir)):
    run_files.write_json_atomic(path, results)
  print(format_table(results), flush=True)
  return results
