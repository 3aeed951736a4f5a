"""Tests of pcl_jax.clustering.balanced: Sinkhorn-Knopp equipartition against a dense numpy
reference (float64, the textbook alternation of row and column normalisations), the member-mean
centroids, and the E-step's `clustering.levels='balanced'`."""

import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from pcl_jax import clustering
from pcl_jax.clustering import balanced


def unit_rows(x):
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def crowded_points(num_points=300, k=6, dim=8, seed=0):
  """Points of which most sit near the first of k unit centroids: nearest-centroid clusters are
  far from equal-sized."""
  rng = np.random.default_rng(seed)
  centroids = unit_rows(rng.standard_normal((k, dim)))
  owner = np.where(rng.random(num_points) < 0.7, 0, rng.integers(1, k, num_points))
  x = unit_rows(centroids[owner] + 0.4 * rng.standard_normal((num_points, dim)))
  return x, centroids


def numpy_sinkhorn(x, centroids, epsilon, iterations):
  """Dense Sinkhorn-Knopp: Q = exp(S / epsilon) / sum, then `iterations` times rows to 1/N and
  columns to 1/k; each sample takes its row's largest entry. Returns (labels, plan)."""
  unit = centroids / np.linalg.norm(centroids, axis=1, keepdims=True)
  log_plan = x.astype(np.float64) @ unit.T.astype(np.float64) / epsilon
  num_points, k = log_plan.shape
  for _ in range(iterations):
    log_plan -= special.logsumexp(log_plan, axis=1, keepdims=True) + np.log(num_points)
    log_plan -= special.logsumexp(log_plan, axis=0, keepdims=True) + np.log(k)
  return log_plan.argmax(1), np.exp(log_plan)


@pytest.mark.parametrize('block_elements', [1 << 22, 64])
@pytest.mark.parametrize('epsilon, iterations', [(0.05, 3), (0.2, 10)])
def test_assignments_match_dense_numpy_sinkhorn(monkeypatch, block_elements, epsilon,
                                                iterations):
  # 64 elements per block: 10 rows of k=6 per block, the 300 rows in 30 blocks, the last padded.
  monkeypatch.setattr(balanced, '_BLOCK_ELEMENTS', block_elements)
  x, centroids = crowded_points()
  want, plan = numpy_sinkhorn(x, 1.5 * centroids, epsilon, iterations)
  got = np.asarray(balanced.sinkhorn_assignments(x, 1.5 * centroids, epsilon=epsilon,
                                                 iterations=iterations))
  # Rows whose two largest entries are within float32 rounding may go either way.
  top2 = np.sort(np.log(plan), axis=1)[:, -2:]
  clear = top2[:, 1] - top2[:, 0] > 1e-3
  assert clear.mean() > 0.9
  np.testing.assert_array_equal(got[clear], want[clear])


def test_many_iterations_make_the_clusters_about_equal_sized():
  x, centroids = crowded_points()
  nearest = np.bincount((x @ centroids.T).argmax(1), minlength=6)
  labels = np.asarray(balanced.sinkhorn_assignments(x, centroids, epsilon=0.02, iterations=200))
  sizes = np.bincount(labels, minlength=6)
  assert nearest.max() > 2 * x.shape[0] / 6  # the crowded cluster
  assert sizes.max() - sizes.min() <= 0.2 * x.shape[0] / 6, sizes


@pytest.mark.parametrize('spherical', [False, True])
def test_rebalance_centroids_are_member_means_and_distances_theirs(spherical):
  x, centroids = crowded_points()
  got_centroids, im2cluster, sq_dist = balanced.rebalance(
      x, centroids, epsilon=0.05, iterations=3, spherical=spherical)
  im2cluster = np.asarray(im2cluster)
  np.testing.assert_array_equal(
      im2cluster, balanced.sinkhorn_assignments(x, centroids, epsilon=0.05, iterations=3))
  want = np.stack([x[im2cluster == c].mean(0) for c in range(6)])
  if spherical:
    want /= np.linalg.norm(want, axis=1, keepdims=True)
  np.testing.assert_allclose(np.asarray(got_centroids), want, atol=1e-6)
  np.testing.assert_allclose(np.asarray(sq_dist), ((x - want[im2cluster]) ** 2).sum(1),
                             rtol=1e-5, atol=1e-7)


def test_an_empty_cluster_keeps_its_centroid():
  # Sinkhorn-Knopp gives every column mass, but a hard argmax can still leave one empty.
  x, centroids = crowded_points(k=3)
  im2cluster = jnp.asarray(np.arange(x.shape[0]) % 2, jnp.int32)  # cluster 2 has no member
  got = np.asarray(balanced._member_means(x, centroids, im2cluster, spherical=False))
  np.testing.assert_array_equal(got[2], centroids[2])
  np.testing.assert_allclose(got[0], x[0::2].mean(0), atol=1e-6)


def test_balanced_levels_are_more_even_than_kmeans_and_keep_the_concentration_formula():
  x, _ = crowded_points(num_points=600, k=8, dim=8, seed=3)
  options = dict(backend='jax', niter=10, nredo=1, seed=0, spherical=False, temperature=0.2,
                 use_float16=True)
  plain = clustering.cluster_levels(x, [20], levels='flat', **options)[0]
  even = clustering.cluster_levels(x, [20], levels='balanced', sinkhorn_epsilon=0.05,
                                   sinkhorn_iterations=50, **options)[0]
  spread = lambda level: np.bincount(np.asarray(level['im2cluster']), minlength=20).std()
  assert spread(even) < 0.5 * spread(plain)
  assert even['im2cluster'].dtype == jnp.int32
  np.testing.assert_allclose(np.linalg.norm(np.asarray(even['centroids']), axis=1), 1.0,
                             atol=1e-6)
  # The concentration is computed from the distances to the balanced clusters' own centres.
  raw_centroids, im2cluster, sq_dist = balanced.rebalance(
      x, clustering.kmeans(x, 20, backend='jax', niter=10, nredo=1, seed=0, spherical=False)[0],
      epsilon=0.05, iterations=50, spherical=False)
  np.testing.assert_array_equal(np.asarray(even['im2cluster']), np.asarray(im2cluster))
  np.testing.assert_allclose(np.asarray(even['concentration']),
                             np.asarray(clustering.concentration(sq_dist, im2cluster, 20, 0.2)),
                             rtol=1e-6)
  del raw_centroids
