"""Tests of pcl_jax/evaluation/cluster_head.py and its place in the evaluation: the loss and the
neighbour mining against numpy, the fit on synthetic sets, the driver's results and errors."""

import json

import numpy as np
import pytest

from benchmarks import evaluate as evaluate_benchmark
from configs import test as test_config
from pcl_jax import configuration
from pcl_jax.evaluation import assignments as assignments_lib
from pcl_jax.evaluation import cluster_head
from pcl_jax.evaluation import clustering_quality
from pcl_jax.evaluation import driver


def _numpy_scan_loss(anchor_logits, neighbour_logits, entropy_weight):
  """SCAN's loss written out in float64 numpy."""
  def softmax(logits):
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)
  anchors = softmax(anchor_logits.astype(np.float64))
  neighbours = softmax(neighbour_logits.astype(np.float64))
  consistency = -np.mean([np.log(anchors[i] @ neighbours[i] + 1e-8)
                          for i in range(len(anchors))])
  mean = anchors.mean(axis=0)
  entropy = -np.sum(mean * np.log(mean + 1e-8))
  return consistency - entropy_weight * entropy, consistency, entropy


@pytest.mark.parametrize('entropy_weight', [0.0, 2.0, 5.0])
def test_scan_loss_matches_numpy(entropy_weight):
  rng = np.random.default_rng(0)
  anchor_logits = 3.0 * rng.normal(size=(64, 7)).astype(np.float32)
  neighbour_logits = 3.0 * rng.normal(size=(64, 7)).astype(np.float32)
  got = cluster_head.scan_loss(anchor_logits, neighbour_logits, entropy_weight)
  want = _numpy_scan_loss(anchor_logits, neighbour_logits, entropy_weight)
  np.testing.assert_allclose(np.array(got, np.float64), want, rtol=1e-5, atol=1e-5)


def test_scan_loss_prefers_agreeing_balanced_assignments():
  """Confident agreeing neighbours spread over all clusters score below a collapse into one."""
  balanced = 10.0 * np.eye(4, dtype=np.float32)[np.arange(40) % 4]
  collapsed = 10.0 * np.eye(4, dtype=np.float32)[np.zeros(40, int)]
  assert (cluster_head.scan_loss(balanced, balanced, 2.0)[0]
          < cluster_head.scan_loss(collapsed, collapsed, 2.0)[0])


def test_neighbours_match_numpy_across_chunks():
  rng = np.random.default_rng(1)
  num = cluster_head.MINING_CHUNK + 37  # two chunks, the second padded
  features = rng.normal(size=(num, 6)).astype(np.float32)
  got = np.asarray(cluster_head.mine_neighbours(features, num_neighbours=5))
  distance = ((features[:, None, :].astype(np.float64) - features[None]) ** 2).sum(-1)
  np.fill_diagonal(distance, np.inf)
  want = np.argsort(distance, axis=1)[:, :5]
  np.testing.assert_array_equal(np.sort(got, axis=1), np.sort(want, axis=1))


def _blobs(per_class=60):
  """Five well-separated classes of unit-norm 16-d features (benchmarks/evaluate.py's sets)."""
  return evaluate_benchmark.synthetic_features(5, per_class, 16, noise=0.1)


def test_fit_recovers_separated_blobs_and_is_deterministic_by_seed():
  features, labels = _blobs()
  first = cluster_head.fit_assign(features, 5, seed=3)
  assert clustering_quality.clustering_metrics(labels, first['assignments'])['nmi'] > 0.99
  again = cluster_head.fit_assign(features, 5, seed=3)
  np.testing.assert_array_equal(first['assignments'], again['assignments'])
  assert first['losses'] == again['losses']
  assert first['loss'] == min(first['losses']) and len(first['losses']) == cluster_head.NUM_HEADS


def test_neighbours_beat_kmeans_on_elongated_clusters():
  """Four Gaussians stretched along random directions: k-means cuts across the long ones (they
  hold most of the variance), nearest neighbours stay within a class, so the head does better."""
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(4), 100)
  means = rng.normal(size=(4, 16))
  directions = rng.normal(size=(4, 16))
  directions /= np.linalg.norm(directions, axis=1, keepdims=True)
  features = (means[labels] + 0.3 * rng.normal(size=(labels.size, 16))
              + 4.0 * rng.normal(size=(labels.size, 1)) * directions[labels]).astype(np.float32)
  kmeans = clustering_quality.clustering_quality(features, labels, runs=3)
  head = clustering_quality.clustering_metrics(
      labels, cluster_head.fit_assign(features, 4)['assignments'])
  assert head['nmi'] > kmeans['nmi'] + 0.1 and head['acc'] > kmeans['acc'] + 10


def _config(**eval_settings):
  config = test_config.get_config()
  config.eval.fewshot_episodes = 20
  config.eval.fewshot_queries = 5
  config.eval.kmeans_runs = 2
  config.eval.cluster_head = True
  for name, value in eval_settings.items():
    config.eval[name] = value
  return config


def test_evaluate_features_adds_the_head_and_its_assignments(capsys):
  features, labels = _blobs(per_class=40)
  assignments = {}
  results = driver.evaluate_features(_config(), features[1::2], labels[1::2], features[::2],
                                     labels[::2], assignments=assignments)
  head = results['cluster_head']
  assert {'k', 'nmi', 'ami', 'ari', 'acc', 'method'} <= set(head)
  assert head['k'] == 5 and head['method'] == cluster_head.METHOD
  assert head['num_fit'] == labels.size  # fitted on both splits
  assert assignments['head'].shape == (labels.size // 2,)
  np.testing.assert_allclose(
      head['nmi'], clustering_quality.clustering_metrics(labels[1::2], assignments['head'])['nmi'])
  assert head['nmi'] > 0.99
  print(driver.format_table(results))
  assert 'cluster head (scan) k=5 NMI' in capsys.readouterr().out
  off = driver.evaluate_features(_config(cluster_head=False), features, labels)
  assert 'cluster_head' not in off


def test_head_k_without_labels_and_the_too_few_samples_error():
  features, _ = _blobs(per_class=4)
  results, assignments = cluster_head.cluster_head_results(features, None, 3)
  assert results['nmi'] is None and results['skipped'] == 'no labels'
  assert assignments.shape == (20,) and assignments.max() < 3
  config = _config()  # schedule 'all_clusters' of the test config: its coarsest first level
  levels = configuration.validate(config).active
  assert driver.cluster_head_k(config, None, 1000) == min(levels)
  assert driver.cluster_head_k(config, None, 1000, cluster_levels=[40, 7]) == 7
  assert driver.cluster_head_k(_config(cluster_head_k=9), None, 1000) == 9
  schedule = configuration.validate(config)
  schedule.load_state_dict({**schedule.state_dict(), 'start': 1})  # one change: [20, 10]
  final = assignments_lib.final_levels(config, {'schedule': schedule.state_dict()})
  assert sorted(final) == [10, 20]
  assert driver.cluster_head_k(config, None, 1000, cluster_levels=final) == 10
  with pytest.raises(configuration.UserError,
                     match=r'eval.cluster_head: the eval split has 8 images, fewer than its k=9 '
                           r'clusters; set --config.eval.cluster_head_k to at most 8'):
    driver.cluster_head_k(_config(cluster_head_k=9), None, 8)


def test_scoring_saved_features_writes_the_head(tmp_path):
  """`python -m pcl_jax.evaluation.score ... --config.eval.cluster_head=True`: the same stage on
  any model's saved features."""
  from pcl_jax.evaluation import score  # pylint: disable=g-import-not-at-top
  features, labels = _blobs(per_class=40)
  train, test = tmp_path / 'features_train.npz', tmp_path / 'features_test.npz'
  np.savez(train, features=features[::2], labels=labels[::2])
  np.savez(test, features=features[1::2], labels=labels[1::2])
  results = score.score_features(_config(), f'{train},{test}', str(tmp_path / 'scores.json'))
  direct = driver.evaluate_features(_config(), features[1::2], labels[1::2], features[::2],
                                    labels[::2])
  assert results['cluster_head']['nmi'] == direct['cluster_head']['nmi']
  with open(tmp_path / 'scores.json') as handle:
    assert json.load(handle)['cluster_head']['k'] == 5
  # The head's column in score's assignments CSV, row for row the head's own assignment.
  kept = {}
  driver.evaluate_features(_config(), features[1::2], labels[1::2], features[::2], labels[::2],
                           assignments=kept)
  rows = np.genfromtxt(tmp_path / 'assignments_test.csv', delimiter=',', names=True, dtype=int)
  np.testing.assert_array_equal(rows['head'], kept['head'])


def test_scoring_unlabelled_features_clusters_them_at_the_run_s_coarsest_level(tmp_path):
  """Saved features without labels (an unlabelled folder's) naming the run's final levels: the
  head clusters them at the coarsest level, its metrics skipped, its column in the CSV."""
  from pcl_jax.evaluation import score  # pylint: disable=g-import-not-at-top
  features, _ = _blobs(per_class=8)
  path = tmp_path / 'features_test.npz'
  np.savez(path, features=features, split=np.asarray('test'), levels=np.asarray([7, 4]),
           level_seed=np.asarray(3))
  results = score.score_features(_config(), str(path), str(tmp_path / 'scores.json'))
  head = results['cluster_head']
  assert head['k'] == 4 and head['nmi'] is None and head['skipped'] == 'no labels'
  rows = np.genfromtxt(tmp_path / 'assignments_test.csv', delimiter=',', names=True, dtype=int)
  assert rows.dtype.names == ('index', 'level_7', 'level_4', 'head')
  assert len(rows) == len(features) and set(rows['head']) <= set(range(4))
