"""Tests of pcl_jax/evaluation/: each metric against sklearn/scipy/numpy; --mode=eval end to end."""

import itertools
import re
import json
import os

import numpy as np
import pytest
from sklearn import linear_model
from sklearn import metrics as sk_metrics

from configs import test as test_config
from pcl_jax import configuration
from pcl_jax.evaluation import clustering_quality
from pcl_jax.evaluation import driver
from pcl_jax.evaluation import fewshot
from pcl_jax.evaluation import knn
from pcl_jax.evaluation import linear_probe
from pcl_jax.evaluation import protocol
from pcl_jax import models
from tests import cli_forkserver
from tests import runs


def _clustered_features(num_classes, per_class, dim, noise, seed=0):
  rng = np.random.default_rng(seed)
  centers = rng.normal(size=(num_classes, dim))
  labels = np.repeat(np.arange(num_classes), per_class)
  features = centers[labels] + noise * rng.normal(size=(labels.size, dim))
  return features.astype(np.float32), labels


# ----------------------------------------------------------------------------------------------
# Clustering quality.


def _numpy_nmi(labels, assignments):
  """NMI with arithmetic normalisation, from the contingency table (independent of sklearn)."""
  _, a = np.unique(labels, return_inverse=True)
  _, b = np.unique(assignments, return_inverse=True)
  joint = np.zeros((a.max() + 1, b.max() + 1))
  np.add.at(joint, (a, b), 1)
  joint /= joint.sum()
  pa, pb = joint.sum(1), joint.sum(0)
  nz = joint > 0
  mutual = np.sum(joint[nz] * np.log(joint[nz] / np.outer(pa, pb)[nz]))
  entropy = lambda p: -np.sum(p[p > 0] * np.log(p[p > 0]))
  return mutual / (0.5 * (entropy(pa) + entropy(pb)))


def _brute_force_matching_accuracy(labels, assignments):
  classes, clusters = np.unique(labels), np.unique(assignments)
  best = 0
  for perm in itertools.permutations(classes, len(clusters)):
    mapping = dict(zip(clusters, perm))
    best = max(best, np.sum(np.array([mapping[c] for c in assignments]) == labels))
  return 100.0 * best / labels.size


def test_clustering_metrics_match_sklearn_and_numpy():
  rng = np.random.default_rng(1)
  labels = rng.integers(0, 5, size=300)
  assignments = np.where(rng.random(300) < 0.6, labels, rng.integers(0, 6, size=300))
  result = clustering_quality.clustering_metrics(labels, assignments)
  assert result['nmi'] == pytest.approx(sk_metrics.normalized_mutual_info_score(labels,
                                                                                assignments))
  assert result['nmi'] == pytest.approx(_numpy_nmi(labels, assignments), rel=1e-9)
  assert result['ami'] == pytest.approx(sk_metrics.adjusted_mutual_info_score(labels,
                                                                              assignments))
  assert result['ari'] == pytest.approx(sk_metrics.adjusted_rand_score(labels, assignments))
  small_labels, small_assignments = labels[:40] % 4, assignments[:40] % 4
  assert clustering_quality.hungarian_accuracy(small_labels, small_assignments) == pytest.approx(
      _brute_force_matching_accuracy(small_labels, small_assignments))


def test_hungarian_accuracy_of_a_permuted_labelling_is_100():
  labels = np.random.default_rng(2).integers(0, 7, size=200)
  permutation = np.array([3, 6, 0, 1, 5, 2, 4]) + 10  # renamed as well as permuted
  assert clustering_quality.hungarian_accuracy(labels, permutation[labels]) == 100.0
  result = clustering_quality.clustering_metrics(labels, permutation[labels])
  assert result['nmi'] == pytest.approx(1.0) and result['ari'] == pytest.approx(1.0)


def test_clustering_quality_uses_k_equal_to_number_of_classes():
  labels = np.repeat([4, 7, 9], 10)
  calls = []

  def fake_kmeans(x, k, **kwargs):
    calls.append((k, kwargs))
    return np.zeros((k, x.shape[1])), labels * 3 + 1, np.zeros(labels.size)

  result = clustering_quality.clustering_quality(np.zeros((30, 4)), labels, backend='jax',
                                                 kmeans_fn=fake_kmeans)
  assert calls[0][0] == 3 and calls[0][1]['backend'] == 'jax'
  assert result['k'] == 3 and result['acc'] == 100.0 and result['nmi'] == pytest.approx(1.0)


def test_clustering_quality_averages_runs_of_successive_seeds_with_fixed_settings():
  labels = np.repeat([0, 1, 2], 4)
  # Run s puts the first s images of class 0 into cluster 1: each run scores differently.
  seeds = []

  def fake_kmeans(x, k, *, seed, niter, nredo, spherical, **unused):
    seeds.append((seed, niter, nredo, spherical))
    assignments = labels.copy()
    assignments[:seed - 5] = 1
    return np.zeros((k, x.shape[1])), assignments, np.zeros(labels.size)

  result = clustering_quality.clustering_quality(np.zeros((12, 2)), labels, runs=3, seed=5,
                                                 spherical=True, kmeans_fn=fake_kmeans)
  fixed = (clustering_quality.KMEANS_NITER, clustering_quality.KMEANS_NREDO, True)
  assert seeds == [(5,) + fixed, (6,) + fixed, (7,) + fixed]
  per_run = []
  for moved in range(3):
    assignments = labels.copy()
    assignments[:moved] = 1
    per_run.append(sk_metrics.normalized_mutual_info_score(labels, assignments))
  assert result['nmi_runs'] == pytest.approx(per_run)
  assert result['nmi'] == pytest.approx(np.mean(per_run))
  assert result['nmi_sd'] == pytest.approx(np.std(per_run, ddof=1))
  assert result['acc'] == pytest.approx(100 * np.mean([12, 11, 10]) / 12)
  assert result['runs'] == 3 and result['spherical'] is True
  with pytest.raises(ValueError, match='runs >= 1'):
    clustering_quality.clustering_quality(np.zeros((12, 2)), labels, runs=0,
                                          kmeans_fn=fake_kmeans)


# ----------------------------------------------------------------------------------------------
# Few-shot.


def test_episodes_are_valid():
  labels = np.repeat(np.arange(8), [30, 30, 30, 30, 30, 30, 10, 3])  # classes 6, 7 too small
  table, counts = fewshot.class_table(labels)
  support, query = fewshot.sample_episodes(np.random.default_rng(0), table, counts, ways=5,
                                            shots=5, queries=15, episodes=200, batch=64)
  support, query = np.asarray(support), np.asarray(query)
  assert support.shape == (200, 5, 5) and query.shape == (200, 5, 15)
  members = np.concatenate([support, query], axis=2)  # [E, ways, 20]
  member_labels = labels[members]
  assert (member_labels == member_labels[:, :, :1]).all()  # one class per row
  assert all(len(set(row)) == 5 for row in member_labels[:, :, 0])  # distinct classes
  assert all(len(set(m.ravel())) == 100 for m in members)  # distinct images
  assert not np.isin(member_labels, [6, 7]).any()  # ineligible classes never drawn
  assert len(set(map(tuple, member_labels[:, :, 0]))) > 50  # episodes differ


def test_fewshot_separable_features_give_100():
  features, labels = _clustered_features(10, 25, 32, noise=0.01)
  for shots in (1, 5):
    result = fewshot.fewshot_eval(features, labels, shots=shots, queries=15, episodes=100)
    assert result['mean'] == 100.0 and result['ci95'] == 0.0
    assert result['logreg']['mean'] == 100.0
    assert result['episodes'] == 100 and result['shots'] == shots


def test_fewshot_random_features_give_chance():
  rng = np.random.default_rng(3)
  features = rng.normal(size=(600, 32)).astype(np.float32)
  labels = np.repeat(np.arange(12), 50)
  result = fewshot.fewshot_eval(features, labels, ways=5, shots=5, queries=15, episodes=1000)
  assert 16.0 < result['mean'] < 24.0
  assert 16.0 < result['logreg']['mean'] < 24.0
  assert 0.0 < result['ci95'] < 2.0


def test_fewshot_logreg_matches_sklearn():
  features, labels = _clustered_features(10, 40, 24, noise=2.5, seed=4)
  features = np.asarray(models.l2_normalize(features))  # pylint: disable=protected-access
  table, counts = fewshot.class_table(labels)
  support, query = fewshot.sample_episodes(np.random.default_rng(5), table, counts, ways=5,
                                            shots=5, queries=15, episodes=8)
  # pylint: disable-next=protected-access
  centroid_correct, logreg_correct = fewshot._episode_accuracies(
      features, support, query, 1.0 / fewshot.FEWSHOT_LOGREG_C,
      logreg_steps=fewshot.FEWSHOT_LOGREG_STEPS, episode_batch=3)
  sklearn_acc, numpy_centroid_acc = [], []
  query_y = np.repeat(np.arange(5), 15)
  for support_index, query_index in zip(np.asarray(support), np.asarray(query)):
    support_x, query_x = features[support_index.ravel()], features[query_index.ravel()]
    classifier = linear_model.LogisticRegression(C=fewshot.FEWSHOT_LOGREG_C, tol=1e-8,
                                                 max_iter=1000)
    classifier.fit(support_x, np.repeat(np.arange(5), 5))
    sklearn_acc.append(np.mean(classifier.predict(query_x) == query_y))
    centroids = support_x.reshape(5, 5, -1).mean(1)
    distance = ((query_x[:, None] - centroids[None]) ** 2).sum(-1)
    numpy_centroid_acc.append(np.mean(distance.argmin(1) == query_y))
  assert 0.2 < np.mean(sklearn_acc) < 0.99  # a non-trivial problem
  # At most one query of 75 may flip per episode (ties at float precision).
  np.testing.assert_allclose(np.asarray(logreg_correct) / 75, sklearn_acc, atol=1.5 / 75)
  np.testing.assert_allclose(np.asarray(centroid_correct) / 75, numpy_centroid_acc, atol=1e-6)


def test_fewshot_too_few_classes_raises():
  features, labels = _clustered_features(4, 30, 8, noise=0.1)
  with pytest.raises(ValueError, match='needs 5 classes'):
    fewshot.fewshot_eval(features, labels, ways=5, shots=1, episodes=10)


# ----------------------------------------------------------------------------------------------
# kNN and the linear probe.


def _numpy_knn(train_x, train_y, query_x, k, temperature, num_classes):
  train_x = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
  query_x = query_x / np.linalg.norm(query_x, axis=1, keepdims=True)
  predictions = []
  for row in query_x.astype(np.float64) @ train_x.T.astype(np.float64):
    top = np.argsort(-row)[:k]
    scores = np.zeros(num_classes)
    np.add.at(scores, train_y[top], np.exp(row[top] / temperature))
    predictions.append(scores.argmax())
  return np.array(predictions)


def test_knn_matches_numpy():
  rng = np.random.default_rng(6)
  train_x = rng.normal(size=(300, 16)).astype(np.float32)
  train_y = rng.integers(0, 6, size=300)
  query_x = rng.normal(size=(77, 16)).astype(np.float32)  # not a multiple of the chunk
  query_y = rng.integers(0, 6, size=77)
  expected = _numpy_knn(train_x, train_y, query_x, 20, 0.07, 6)
  predictions = knn.knn_predict(train_x, train_y, query_x, k=20, temperature=0.07,
                                     num_classes=6, chunk=32)
  np.testing.assert_array_equal(predictions, expected)
  top1 = knn.knn_top1(train_x, train_y, query_x, query_y, k=20, temperature=0.07,
                           num_classes=6, chunk=32)
  assert top1 == pytest.approx(100.0 * np.mean(expected == query_y))


def test_validation_knn_detects_disjoint_classes():
  features, labels = _clustered_features(6, 20, 16, noise=0.3)
  train_mask = labels < 3
  # Shared classes: train -> val.
  shared = knn.validation_knn_top1(features[train_mask][::2], labels[train_mask][::2],
                                        features[train_mask][1::2], labels[train_mask][1::2],
                                        k=5, temperature=0.1)
  assert shared == 100.0
  # Disjoint classes (mini-ImageNet val/test): within-split halves, train features unused.
  assert not protocol.shares_classes(labels[train_mask], labels[~train_mask])
  disjoint = knn.validation_knn_top1(None, None, features[~train_mask] * 1.0,
                                          labels[~train_mask] + 100, k=5, temperature=0.1)
  assert disjoint == 100.0
  reference, query = protocol.split_halves(labels)
  assert np.intersect1d(reference, query).size == 0
  assert reference.size + query.size == labels.size
  assert (np.bincount(labels[reference]) == 10).all()


def test_linear_probe_on_separable_features():
  features, labels = _clustered_features(8, 60, 32, noise=0.8, seed=7)
  order = np.random.default_rng(0).permutation(labels.size)
  train, test = order[:320], order[320:]
  result = linear_probe.linear_probe(features[train], labels[train] + 5, features[test],
                                     labels[test] + 5, steps=150)
  assert result['top1'] > 95.0
  assert result['lr'] in linear_probe.PROBE_LEARNING_RATES
  assert set(result['holdout_top1']) == {f'{lr:g}' for lr in linear_probe.PROBE_LEARNING_RATES}


# ----------------------------------------------------------------------------------------------
# --mode=eval from a checkpoint.


@pytest.fixture(scope='module')
def trained_workdir(tiny_run, tmp_path_factory):
  """The shared 1-epoch run (one InfoNCE epoch is enough to have a checkpoint), copied: the
  tests below evaluate into it."""
  return runs.copy_run(tiny_run, tmp_path_factory.mktemp('eval_run'))


def _eval_config():
  config = test_config.get_config()
  config.eval.fewshot_episodes = 40
  config.eval.save_features = True
  return config


def test_evaluate_checkpoint_writes_complete_results(trained_workdir, capsys):
  results = driver.evaluate_checkpoint(_eval_config(), trained_workdir)
  with open(os.path.join(trained_workdir, 'eval', 'results.json')) as handle:
    written = json.load(handle)
  for key in ('knn_top1', 'linear_top1', 'fewshot', 'clustering', 'split', 'checkpoint_step'):
    assert key in written
  assert written['split'] == 'test' and written['checkpoint_step'] == 1
  assert written['protocol'] == protocol.PROTOCOL_TRAIN_TO_EVAL  # digits: shared classes
  for name in ('5way1shot', '5way5shot'):
    entry = written['fewshot'][name]
    assert entry['episodes'] == 40
    assert 0.0 <= entry['mean'] <= 100.0 and entry['ci95'] >= 0.0
    assert 0.0 <= entry['logreg']['mean'] <= 100.0
  assert set(written['clustering']) >= {'k', 'nmi', 'ami', 'ari', 'acc'}
  assert written['clustering']['k'] == 10
  assert 0.0 <= written['knn_top1'] <= 100.0 and 0.0 <= written['linear_top1'] <= 100.0
  assert written['knn_top1'] == pytest.approx(results['knn_top1'])
  saved = np.load(os.path.join(trained_workdir, 'eval', 'features_test.npz'))
  assert saved['features'].shape == (written['num_images'], 16)
  np.testing.assert_allclose(np.linalg.norm(saved['features'], axis=1), 1.0, atol=1e-4)
  assert saved['labels'].shape == (written['num_images'],)
  assert 'kNN top-1' in capsys.readouterr().out

  # A rerun refuses to overwrite silently.
  with pytest.raises(configuration.UserError, match='--overwrite'):
    driver.evaluate_checkpoint(_eval_config(), trained_workdir)


def test_model_mismatch_is_a_user_error(trained_workdir):
  config = _eval_config()
  config.model.dim = 32
  with pytest.raises(configuration.UserError, match=r'model\.dim=32.*model\.dim=16'):
    driver.evaluate_checkpoint(config, trained_workdir, overwrite=True)


def test_missing_checkpoint_is_a_clear_error(tmp_path, trained_workdir):
  with pytest.raises(FileNotFoundError, match='train first'):
    driver.evaluate_checkpoint(_eval_config(), str(tmp_path))
  with pytest.raises(FileNotFoundError, match='available: \\[1\\]'):
    driver.evaluate_checkpoint(_eval_config(), trained_workdir, epochs_done=7, overwrite=True)


def _comparable(results: dict) -> dict:
  """A results dict without what differs between two scorings of the same features: the times,
  the names of the files scored and of the files written (score draws no galleries)."""
  kept = {key: value for key, value in results.items() if key not in ('timing_s', 'features')}
  kept['assignments'] = {key: value for key, value in results['assignments'].items()
                         if key != 'files'}
  return kept


def test_scoring_saved_features_equals_the_runs_own_eval(trained_workdir, tmp_path):
  """`python -m pcl_jax.evaluation.score` on the npz files a run saved gives that run's
  `--mode=eval` results exactly (the same code path, driver.evaluate_features)."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  evaluated = driver.evaluate_checkpoint(_eval_config(), trained_workdir, overwrite=True)
  eval_dir = os.path.join(trained_workdir, 'eval')
  # digits: train -> eval, so both splits were embedded and saved.
  assert evaluated['protocol'] == protocol.PROTOCOL_TRAIN_TO_EVAL
  assert {'features_test.npz', 'features_train.npz'} <= set(os.listdir(eval_dir))
  out = str(tmp_path / 'scored.json')
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  command = [sys.executable, '-m', 'pcl_jax.evaluation.score', f'--features={eval_dir}',
             '--config=configs/test.py', '--config.eval.fewshot_episodes=40', f'--out={out}']
  result = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=300,
                          check=False)
  assert result.returncode == 0, result.stderr
  with open(out) as handle:
    scored = json.load(handle)
  assert _comparable(scored) == _comparable(json.loads(json.dumps(evaluated)))
  assert scored['checkpoint_step'] == 1 and scored['encoder'] == 'key'
  # The same clusterings, the run's levels included (the npz names them), row for row.
  assert evaluated['assignments']['levels'] and scored['assignments']['columns'] == (
      evaluated['assignments']['columns'])
  with open(tmp_path / 'assignments_test.csv') as scored_csv, open(
      os.path.join(eval_dir, 'assignments_test.csv')) as evaluated_csv:
    assert scored_csv.read() == evaluated_csv.read()
  assert scored['features']['train'].endswith('features_train.npz')
  # The same files named explicitly (TRAIN.npz,EVAL.npz), in-process.
  from pcl_jax.evaluation import score  # pylint: disable=g-import-not-at-top
  explicit = score.score_features(
      _eval_config(), ','.join(os.path.join(eval_dir, f'features_{split}.npz')
                               for split in ('train', 'test')), str(tmp_path / 'explicit.json'))
  assert _comparable(explicit) == _comparable(evaluated)


def _write_npz(path, **arrays):
  np.savez(path, **arrays)
  return str(path)


def test_scoring_features_of_any_model(tmp_path):
  """Files with only `features` and `labels` (as the PyTorch reference script writes): the
  split comes from the file name, and an eval file alone is scored on within-eval halves."""
  from pcl_jax.evaluation import score  # pylint: disable=g-import-not-at-top
  features, labels = _clustered_features(6, 30, 16, noise=0.2)
  train = _write_npz(tmp_path / 'features_train.npz', features=features[::2],
                     labels=labels[::2])
  test = _write_npz(tmp_path / 'features_test.npz', features=features[1::2], labels=labels[1::2])
  config = _eval_config()
  config.eval.fewshot_queries = 5
  pair = score.score_features(config, f'{train},{test}', str(tmp_path / 'pair.json'))
  assert pair['split'] == 'test' and pair['checkpoint_step'] is None
  assert pair['protocol'] == protocol.PROTOCOL_TRAIN_TO_EVAL and pair['knn_top1'] == 100.0
  header, rows = _read_csv(tmp_path / 'assignments_test.csv')  # beside --out
  assert header == ['index', 'label', 'kmeans_6'] and len(rows) == labels[1::2].size
  assert [int(row[1]) for row in rows] == labels[1::2].tolist()
  alone = score.score_features(config, test, None)
  assert alone['protocol'] == protocol.PROTOCOL_EVAL_HALVES
  assert os.path.exists(tmp_path / 'scores_test.json')  # the default --out
  with pytest.raises(configuration.UserError, match='--overwrite'):
    score.score_features(config, test, None)
  # An eval split that is part of the train split is scored on halves (no self-matches).
  joined = _write_npz(tmp_path / 'features_train+test.npz', features=features, labels=labels)
  inside = score.score_features(config, f'{joined},{test}', str(tmp_path / 'inside.json'))
  assert inside['protocol'] == protocol.PROTOCOL_EVAL_HALVES


def test_scoring_errors_are_one_line(tmp_path):
  """One clear error per bad input; through the real command line: one `error:` line, status 2."""
  rng = np.random.default_rng(0)
  good = _write_npz(tmp_path / 'features_test.npz', features=rng.normal(size=(10, 4)),
                    labels=np.arange(10) % 2)
  os.makedirs(tmp_path / 'empty')
  cases = {
      'no such file': f'{tmp_path}/features_nothing.npz',
      "has no array 'features'": _write_npz(tmp_path / 'a.npz', labels=np.arange(3)),
      'have no `labels` but eval features': _write_npz(
          tmp_path / 'd.npz', features=np.zeros((10, 4))) + ',' + good,
      'have dimension 8 but eval features': _write_npz(
          tmp_path / 'b.npz', features=np.zeros((10, 8)), labels=np.arange(10)) + ',' + good,
      r'expected labels \[10\]': _write_npz(tmp_path / 'c.npz', features=np.zeros((10, 4)),
                                            labels=np.arange(9)),
      'no features_test.npz': str(tmp_path / 'empty'),
  }
  # Two through the command line (the one-line output), the rest as the UserError it prints.
  through_cli = ('no such file', 'have dimension 8 but eval features')
  from configs import default as default_config  # pylint: disable=g-import-not-at-top
  from pcl_jax.evaluation import score  # pylint: disable=g-import-not-at-top
  config = default_config.get_config()
  for expected in sorted(set(cases) - set(through_cli)):
    with pytest.raises(configuration.UserError, match=expected):
      score.score_features(config, cases[expected], f'{tmp_path}/out.json')
  # `python -m pcl_jax.evaluation.score`, each in a child of tests/cli_forkserver.py.
  results = cli_forkserver.run_commands(
      {expected: [f'--features={cases[expected]}', f'--out={tmp_path}/out.json']
       for expected in through_cli}, tmp_path, module='pcl_jax.evaluation.score')
  for expected, result in results.items():
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, (expected, result.stderr)
    assert len(lines) == 1 and lines[0].startswith('error: '), result.stderr
    assert re.search(expected, lines[0]), lines[0]


def _read_csv(path):
  import csv  # pylint: disable=g-import-not-at-top
  with open(path, newline='') as handle:
    rows = list(csv.reader(handle))
  return rows[0], rows[1:]


def test_assignments_csv_keeps_the_runs_levels_and_the_evaluations_kmeans(trained_workdir):
  """assignments_<split>.csv: a row per image in feature order, the labels, then the run's final
  levels (clustered as its E-step does, seeded as results.json says) and the clustering-quality
  k-means run of seed EVAL_SEED; a gallery per level."""
  from pcl_jax import clustering  # pylint: disable=g-import-not-at-top
  config = _eval_config()
  results = driver.evaluate_checkpoint(config, trained_workdir, overwrite=True)
  eval_dir = os.path.join(trained_workdir, 'eval')
  kept = results['assignments']
  # tiny_run stopped after its first epoch: the schedule's first window, configs/test.py's.
  assert kept['levels'] == [40, 20] and kept['level_seed'] == config.seed * 1000 + 1
  assert kept['columns'] == ['level_40', 'level_20', 'kmeans_10']
  header, rows = _read_csv(os.path.join(eval_dir, 'assignments_test.csv'))
  assert header == ['index', 'label'] + kept['columns']  # digits: no files, no path column
  with np.load(os.path.join(eval_dir, 'features_test.npz')) as saved:
    features, labels = saved['features'], saved['labels']
    assert 'paths' not in saved.files and saved['levels'].tolist() == [40, 20]
  table = np.asarray(rows, np.int64)
  assert table.shape == (features.shape[0], 5)
  np.testing.assert_array_equal(table[:, 0], np.arange(features.shape[0]))
  np.testing.assert_array_equal(table[:, 1], labels)
  _, kmeans_run, _ = clustering.kmeans(
      features, 10, backend=config.clustering.backend, niter=clustering_quality.KMEANS_NITER,
      nredo=clustering_quality.KMEANS_NREDO, seed=protocol.EVAL_SEED, spherical=False)
  np.testing.assert_array_equal(table[:, 4], np.asarray(kmeans_run))
  levels = clustering.cluster_levels(
      features, [40, 20], backend=config.clustering.backend, niter=config.clustering.niter,
      nredo=config.clustering.nredo, seed=kept['level_seed'],
      spherical=config.clustering.spherical, temperature=config.pcl.temperature,
      use_float16=config.clustering.use_float16)
  for column, level in zip((2, 3), levels):
    np.testing.assert_array_equal(table[:, column], np.asarray(level['im2cluster']))
  assert kept['files'] == {'assignments': 'assignments_test.csv',
                           'gallery level_40': 'gallery_test_level_40.png',
                           'gallery level_20': 'gallery_test_level_20.png'}
  for name in kept['files'].values():
    assert os.path.getsize(os.path.join(eval_dir, name)) > 0


def test_final_levels_are_the_checkpoints_whatever_the_schedule_config():
  from pcl_jax import cluster_schedule  # pylint: disable=g-import-not-at-top
  from pcl_jax.evaluation import assignments  # pylint: disable=g-import-not-at-top
  config = test_config.get_config()  # all_clusters 40,20,10,5, two levels
  state = cluster_schedule.ClusterSchedule.from_config(config.schedule).state_dict()
  state['start'] = 2  # the window moved twice: levels 10, 5
  assert assignments.final_levels(config, {}) == [40, 20]  # no schedule saved: the first window
  config.schedule.all_clusters = '8,4,2'
  assert assignments.final_levels(config, {'schedule': state}) == [10, 5]
  config.schedule.all_clusters = '5,10,20'
  state['all_clusters'], state['start'] = [5, 10, 20], 1
  assert assignments.final_levels(config, {'schedule': state}) == [10, 20]
  config.clustering.levels = 'hierarchical'  # clustered fine -> coarse
  assert assignments.final_levels(config, {'schedule': state}) == [20, 10]


def _unlabelled_folder(root, count):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  os.makedirs(root)
  rng = np.random.default_rng(0)
  for number in range(count):
    pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(os.path.join(root, f'photo_{number:03d}.png'))
  return str(root)


def test_an_unlabelled_folder_trains_and_evaluates(tmp_path):
  """A folder of image files, no class folders: it trains (the E-step included) as one split,
  and --mode=eval writes the label-free results (label metrics null, `skipped: "no labels"`),
  the assignments with paths, the galleries and the features with paths, which
  `evaluation.score` reads back into the same CSV."""
  from pcl_jax.evaluation import score  # pylint: disable=g-import-not-at-top
  config = test_config.get_config()
  config.data.name = 'image_folder'
  config.data.root = _unlabelled_folder(tmp_path / 'photos', 48)
  config.train.steps_per_epoch = 1
  workdir = str(tmp_path / 'run')
  runs.train_run(workdir, config)  # 2 epochs: the second clusters the 48 unlabelled images
  with open(os.path.join(workdir, 'metrics.jsonl')) as handle:
    records = [json.loads(line) for line in handle]
  assert records[-1]['loss_proto'] is not None
  config.eval.save_features = True
  results = driver.evaluate_checkpoint(config, workdir)
  assert results['split'] == 'test' and results['num_images'] == 48
  assert results['knn_top1'] is None and results['linear_top1'] is None
  for entry in (results['knn'], results['linear_probe'], results['clustering'],
                *results['fewshot'].values()):
    assert entry['skipped'] == 'no labels'
  assert results['clustering']['nmi'] is None and results['fewshot']['5way1shot']['mean'] is None
  kept = results['assignments']
  assert kept['columns'] == [f'level_{k}' for k in kept['levels']] and kept['levels']
  assert kept['kmeans_seed'] is None
  eval_dir = os.path.join(workdir, 'eval')
  header, rows = _read_csv(os.path.join(eval_dir, 'assignments_test.csv'))
  assert header == ['index', 'path'] + kept['columns']
  expected_paths = sorted(os.path.join(config.data.root, name)
                          for name in os.listdir(config.data.root) if name.endswith('.png'))
  assert [row[1] for row in rows] == expected_paths
  for name in kept['files'].values():
    assert os.path.isfile(os.path.join(eval_dir, name))
  npz = os.path.join(eval_dir, 'features_test.npz')
  with np.load(npz) as saved:
    assert 'labels' not in saved.files and saved['paths'].tolist() == expected_paths
    assert saved['features'].shape[0] == 48
  scored = score.score_features(config, npz, str(tmp_path / 'scored' / 'scores.json'))
  assert scored['clustering']['skipped'] == 'no labels'
  assert _read_csv(tmp_path / 'scored' / 'assignments_test.csv') == (header, rows)
  assert 'no labels' in driver.format_table(results)


def test_the_query_encoder_can_be_evaluated(trained_workdir, tmp_path):
  """eval.encoder=query scores the query encoder's parameters and BN statistics (the key
  encoder's differ after training), and says so in results.json and the saved features."""
  import shutil  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / 'run')
  shutil.copytree(trained_workdir, workdir)
  features = {}
  for encoder in ('key', 'query'):
    config = _eval_config()
    config.eval.encoder = encoder
    results = driver.evaluate_checkpoint(config, workdir, overwrite=True)
    assert results['encoder'] == encoder
    with np.load(os.path.join(workdir, 'eval', 'features_test.npz')) as saved:
      assert saved['encoder'].item() == encoder
      features[encoder] = saved['features']
  assert not np.allclose(features['key'], features['query'], atol=1e-4)
