"""Tests of pcl_jax.clustering: k-means backends, concentration, hierarchical levels, errors.

Numeric results are checked against plain numpy (the reference's `cau_density` loop, argmin
over the returned centroids) and the two backends against each other from the same initial
centroids. Data is tiny; the whole file runs in well under a minute on one CPU core.
"""

import fractions
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pcl_jax import clustering
from pcl_jax.clustering import backend as kmeans_backend
from pcl_jax.clustering import faiss_kmeans
from pcl_jax.clustering import jax_kmeans
from pcl_jax.clustering import levels

BACKENDS = ('faiss', 'jax')
# faiss's split_clusters perturbation.
SPLIT_EPS = 1.0 / 1024.0


def unit_rows(x):
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def separated_blobs(num_per_blob=40, num_blobs=8, dim=16, spread=0.05, seed=0):
  """Well-separated blobs around random unit means; returns (x, one point of each blob)."""
  rng = np.random.default_rng(seed)
  means = unit_rows(rng.standard_normal((num_blobs, dim)))
  labels = np.repeat(np.arange(num_blobs), num_per_blob)
  x = unit_rows(means[labels] + spread * rng.standard_normal((labels.size, dim)))
  return x, x[::num_per_blob].copy()


def overlapping_points(num_points=1200, dim=16, seed=1):
  return unit_rows(np.random.default_rng(seed).standard_normal((num_points, dim)))


def reference_density(im2cluster, k, sq_dist, temperature):
  """Transcription of the researcher's `cau_density` (D is faiss's [N, 1] distance array)."""
  distances = np.asarray(sq_dist, np.float32)[:, None]
  dcluster = [[] for _ in range(k)]
  for im, i in enumerate(im2cluster):
    dcluster[i].append(distances[im][0])
  density = np.zeros(k)
  for i, dist in enumerate(dcluster):
    if len(dist) > 1:
      d = (np.asarray(dist) ** 0.5).mean() / np.log(len(dist) + 10)
      density[i] = d
  dmax = density.max()
  for i, dist in enumerate(dcluster):
    if len(dist) <= 1:
      density[i] = dmax
  density = density.clip(np.percentile(density, 10), np.percentile(density, 90))
  density = temperature * density / density.mean()
  return density


def numpy_assignment(x, centroids):
  sq_dist = ((x[:, None, :].astype(np.float64) - centroids[None, :, :]) ** 2).sum(-1)
  return sq_dist.argmin(1), sq_dist


def objective(x, centroids, im2cluster):
  return float(((x.astype(np.float64) - centroids[im2cluster]) ** 2).sum())


# ----------------------------------------------------------------------------------------------
# Concentration.


@pytest.mark.parametrize('temperature', [0.1, 0.2])
def test_concentration_matches_reference_loop(temperature):
  rng = np.random.default_rng(0)
  k = 15
  # Clusters 0..9 populated unevenly, 10 and 11 singletons, 12..14 empty.
  im2cluster = np.concatenate([rng.integers(0, 10, size=80), [10, 11]]).astype(np.int32)
  rng.shuffle(im2cluster)
  sq_dist = rng.uniform(0.0, 2.0, size=im2cluster.size).astype(np.float32)
  got = clustering.concentration(jnp.asarray(sq_dist), jnp.asarray(im2cluster), k, temperature)
  want = reference_density(im2cluster, k, sq_dist, temperature)
  assert got.shape == (k,) and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-6)


def test_concentration_with_only_singletons_is_temperature_not_nan():
  # The reference divides 0 by 0 here; we return a uniform temperature.
  got = clustering.concentration(jnp.ones(4), jnp.arange(4), 6, 0.2)
  np.testing.assert_allclose(np.asarray(got), np.full(6, 0.2))


def test_concentration_is_jittable_with_static_k():
  rng = np.random.default_rng(1)
  sq_dist, im2cluster = rng.uniform(size=30).astype(np.float32), np.arange(30) % 7
  fn = jax.jit(clustering.concentration, static_argnums=(2,))
  out = fn(jnp.asarray(sq_dist), jnp.asarray(im2cluster), 7, jnp.float32(0.5))
  np.testing.assert_allclose(np.asarray(out), reference_density(im2cluster, 7, sq_dist, 0.5),
                             rtol=2e-6)


# ----------------------------------------------------------------------------------------------
# Backends.


def test_resolve_backend_on_this_machine():
  assert clustering.resolve_backend('jax') == 'jax'
  if jax.default_backend() == 'cpu':
    assert clustering.resolve_backend('auto') == 'faiss-cpu'
    assert clustering.resolve_backend('faiss') == 'faiss-cpu'


@pytest.mark.parametrize('spherical', [True, False])
def test_backends_agree_on_separated_data_from_same_init(spherical):
  x, init = separated_blobs()
  results = {backend: clustering.kmeans(x, init.shape[0], backend=backend, niter=10,
                                        spherical=spherical, init_centroids=init)
             for backend in BACKENDS}
  (faiss_c, faiss_a, faiss_d), (jax_c, jax_a, jax_d) = results['faiss'], results['jax']
  np.testing.assert_array_equal(np.asarray(faiss_a), np.asarray(jax_a))
  np.testing.assert_allclose(np.asarray(faiss_c), np.asarray(jax_c), atol=1e-5)
  np.testing.assert_allclose(float(jnp.sum(jax_d)), float(jnp.sum(faiss_d)), rtol=1e-5)


def test_backends_agree_on_overlapping_data_from_same_init():
  # Exact mirror of faiss's iteration: still identical when clusters overlap.
  x = overlapping_points()
  init = x[np.random.default_rng(2).choice(x.shape[0], 20, replace=False)]
  outs = [clustering.kmeans(x, 20, backend=b, niter=5, init_centroids=init) for b in BACKENDS]
  np.testing.assert_array_equal(np.asarray(outs[0][1]), np.asarray(outs[1][1]))
  np.testing.assert_allclose(np.asarray(outs[0][0]), np.asarray(outs[1][0]), atol=1e-5)


def test_backends_objectives_close_on_overlapping_data():
  x = overlapping_points()
  objectives = []
  for backend in BACKENDS:
    centroids, im2cluster, _ = clustering.kmeans(x, 20, backend=backend, niter=10, nredo=2)
    objectives.append(objective(x, np.asarray(centroids), np.asarray(im2cluster)))
  assert abs(objectives[1] - objectives[0]) / objectives[0] < 0.05


@pytest.mark.parametrize('backend', BACKENDS + ('auto',))
@pytest.mark.parametrize('spherical', [True, False])
def test_outputs_are_consistent(backend, spherical):
  x = overlapping_points() * 1.5  # Not unit norm, so spherical normalisation shows.
  k = 20
  centroids, im2cluster, sq_dist = clustering.kmeans(x, k, backend=backend, niter=5, nredo=2,
                                                     spherical=spherical, seed=3)
  centroids, im2cluster, sq_dist = map(np.asarray, (centroids, im2cluster, sq_dist))
  assert centroids.shape == (k, x.shape[1]) and centroids.dtype == np.float32
  assert im2cluster.shape == (x.shape[0],) and im2cluster.dtype == np.int32
  assert sq_dist.shape == (x.shape[0],) and sq_dist.dtype == np.float32
  nearest, all_sq_dist = numpy_assignment(x, centroids)
  # Argmin up to float ties: the chosen centroid is (numerically) as near as the best.
  chosen = all_sq_dist[np.arange(x.shape[0]), im2cluster]
  np.testing.assert_allclose(chosen, all_sq_dist.min(1), atol=1e-5)
  assert (nearest == im2cluster).mean() > 0.99
  np.testing.assert_allclose(sq_dist, chosen, rtol=1e-5, atol=1e-6)
  if spherical:
    np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1.0, atol=1e-6)


@pytest.mark.parametrize('backend', BACKENDS)
def test_weights_match_repeated_points(backend):
  x, init = separated_blobs(num_per_blob=10, num_blobs=4, spread=0.3)
  weights = np.random.default_rng(0).integers(1, 4, size=x.shape[0])
  repeated = np.repeat(x, weights, axis=0)
  weighted = clustering.kmeans(x, 4, backend=backend, niter=5, spherical=False,
                               weights=weights, init_centroids=init)
  plain = clustering.kmeans(repeated, 4, backend=backend, niter=5, spherical=False,
                            init_centroids=init)
  np.testing.assert_allclose(np.asarray(weighted[0]), np.asarray(plain[0]), atol=1e-5)
  np.testing.assert_array_equal(np.repeat(np.asarray(weighted[1]), weights), plain[1])


def test_weighted_backends_agree():
  # Shapes shared with other tests (320 x 16, k=8) so the jax backend compiles nothing new.
  x = overlapping_points(320)
  weights = np.random.default_rng(4).uniform(0.5, 3.0, size=x.shape[0])
  init = x[:8]
  outs = [clustering.kmeans(x, 8, backend=b, niter=5, weights=weights, init_centroids=init)
          for b in BACKENDS]
  np.testing.assert_array_equal(np.asarray(outs[0][1]), np.asarray(outs[1][1]))
  np.testing.assert_allclose(np.asarray(outs[0][0]), np.asarray(outs[1][0]), atol=1e-5)


def test_points_per_centroid_rule_is_exact():
  for num_points in (38400, 60000, 3200, 2399, 12345):
    for k in (2, 3, 100, 800, 1600, 2400, 3200):
      if k > num_points:
        continue
      assert kmeans_backend.points_per_centroid(num_points, k, 5 / 3) == num_points * 5 // (3 * k)
      assert kmeans_backend.points_per_centroid(num_points, k, 1 / 3) == num_points // (3 * k)
  assert kmeans_backend.points_per_centroid(300, 10, fractions.Fraction(1, 3)) == 10


def test_jax_subsamples_like_the_documented_rule():
  # N=1200 > k * max_points = 8 * 40: one iteration from `init` gives the means of the subset.
  x = overlapping_points()
  init = x[:8]
  centroids, _, _ = clustering.kmeans(x, 8, backend='jax', niter=1, spherical=False, seed=7,
                                      max_points_per_centroid=40, init_centroids=init)
  subset = np.asarray(jax.random.permutation(jax.random.fold_in(jax.random.PRNGKey(7), 0),
                                             x.shape[0]))[:320]
  labels, _ = numpy_assignment(x[subset], init)
  want = np.stack([x[subset][labels == c].mean(0) for c in range(8)])
  np.testing.assert_allclose(np.asarray(centroids), want, atol=1e-5)


@pytest.mark.parametrize('backend', BACKENDS)
def test_k_equal_n_returns_the_points(backend):
  x = overlapping_points(12, 4) * 2.0
  centroids, im2cluster, sq_dist = clustering.kmeans(x, 12, backend=backend)
  np.testing.assert_allclose(np.asarray(centroids), unit_rows(x), atol=1e-6)
  np.testing.assert_array_equal(np.asarray(im2cluster), np.arange(12))


# ----------------------------------------------------------------------------------------------
# Empty clusters.


def test_split_empty_clusters_copies_a_donor_and_halves_it():
  centroids = jnp.asarray([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [4.0, 5.0, 6.0]])
  weight = jnp.asarray([1.0, 0.0, 9.0])  # Only cluster 2 can donate (size - 1 > 0).
  split, new_weight, num_splits = jax_kmeans._split_empty_clusters(
      centroids, weight, jax.random.PRNGKey(0))
  sign = np.array([1.0, -1.0, 1.0])
  np.testing.assert_allclose(np.asarray(split[1]), [4.0, 5.0, 6.0] * (1 + SPLIT_EPS * sign))
  np.testing.assert_allclose(np.asarray(split[2]), [4.0, 5.0, 6.0] * (1 - SPLIT_EPS * sign))
  np.testing.assert_allclose(np.asarray(new_weight), [1.0, 4.5, 4.5])
  assert int(num_splits) == 1


@pytest.mark.parametrize('backend', BACKENDS)
def test_duplicate_init_is_split_and_leaves_no_empty_cluster(backend):
  x, init = separated_blobs()
  init[3] = init[2]  # Cluster 3 starts empty: ties go to the lower index.
  k = init.shape[0]
  # After one iteration the empty centroid is a perturbed copy of some donor centroid.
  centroids, _, _ = clustering.kmeans(x, k, backend=backend, niter=1, spherical=False,
                                      init_centroids=init)
  centroids = np.asarray(centroids)
  sign = np.where(np.arange(x.shape[1]) % 2 == 0, 1.0, -1.0)
  donor_ratio = (1 - SPLIT_EPS * sign) / (1 + SPLIT_EPS * sign)
  restored = centroids[3] * donor_ratio
  assert min(np.abs(centroids[c] - restored).max() for c in range(k) if c != 3) < 1e-5
  # Given iterations, nothing stays empty.
  _, im2cluster, _ = clustering.kmeans(x, k, backend=backend, niter=10, spherical=False,
                                       init_centroids=init)
  assert np.bincount(np.asarray(im2cluster), minlength=k).min() > 0


# ----------------------------------------------------------------------------------------------
# Padded cluster counts (clustering.pad_k: one k-means program for every k of a run).


def test_padded_rows_follow_pad_k_and_the_platform(monkeypatch):
  assert jax_kmeans.padded_rows('exact', 3200) is None
  assert jax_kmeans.padded_rows('max', 3200) == 3200
  assert jax_kmeans.padded_rows('auto', 3200) is None  # this CPU: exact k
  monkeypatch.setattr(jax_kmeans.jax, 'default_backend', lambda: 'gpu')
  assert jax_kmeans.padded_rows('auto', 3200) == 3200
  assert jax_kmeans.padded_rows('exact', 3200) is None


CASES = {
    'separated': lambda: separated_blobs(num_per_blob=30, num_blobs=12, dim=16)[0],
    'overlapping': lambda: overlapping_points(390),
}


@pytest.mark.parametrize('case', CASES)
def test_padding_gives_exact_ks_clustering_with_one_compilation(case):
  x = CASES[case]()
  weights = np.random.default_rng(0).uniform(0.5, 2.0, x.shape[0]).astype(np.float32)
  ks = (5, 12, 40)
  padding = jax_kmeans.Padding(centroids=64, points=x.shape[0] + 10)

  def run(k, **options):
    return [np.asarray(a) for a in clustering.kmeans(x, k, backend='jax', niter=6, nredo=3,
                                                     seed=7, weights=weights, **options)]
  exact = [run(k) for k in ks]
  compiled = jax_kmeans.compilations()
  for k, (centroids, im2cluster, sq_dist) in zip(ks, exact):
    got_centroids, got_im2cluster, got_sq_dist = run(k, padding=padding)
    assert got_centroids.shape == (k, x.shape[1])
    # The same random draws and assignments; matmuls of another width may round differently.
    np.testing.assert_array_equal(got_im2cluster, im2cluster)
    np.testing.assert_allclose(got_centroids, centroids, atol=1e-6)
    np.testing.assert_allclose(got_sq_dist, sq_dist, atol=1e-6)
  assert jax_kmeans.compilations() - compiled == 1  # one k-means for 5, 12 and 40


def test_padding_splits_empty_clusters_as_exact_k():
  x, init = separated_blobs()
  # Three starting centroids far from every point: empty after the first assignment, each is
  # split from a donor drawn at random (faiss's split_clusters).
  init = np.concatenate([init, np.full((3, init.shape[1]), 10.0, np.float32)])
  k = init.shape[0]
  run = lambda **options: [np.asarray(a) for a in clustering.kmeans(
      x, k, backend='jax', niter=8, spherical=False, init_centroids=init, seed=5, **options)]
  centroids, im2cluster, _ = run()
  got_centroids, got_im2cluster, _ = run(padding=jax_kmeans.Padding(32, x.shape[0]))
  assert np.bincount(im2cluster, minlength=k).min() > 0  # the splits filled them
  np.testing.assert_array_equal(got_im2cluster, im2cluster)
  np.testing.assert_allclose(got_centroids, centroids, atol=1e-6)


def test_padding_keeps_the_initial_draw_and_the_subsample():
  x = overlapping_points(300)
  padding = jax_kmeans.Padding(centroids=50, points=400)
  for options in (dict(niter=0), dict(niter=4, max_points_per_centroid=20)):
    want = clustering.kmeans(x, 9, backend='jax', nredo=2, seed=3, **options)
    got = clustering.kmeans(x, 9, backend='jax', nredo=2, seed=3, padding=padding, **options)
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))


def test_padded_rows_never_win_and_are_never_split_into():
  x, init = separated_blobs()
  init[3] = init[2]  # cluster 3 starts empty and must be split into, not a padding row
  k = init.shape[0]
  _, im2cluster, _ = clustering.kmeans(x, k, backend='jax', niter=10, spherical=False,
                                       init_centroids=init,
                                       padding=jax_kmeans.Padding(128, x.shape[0]))
  assert np.bincount(np.asarray(im2cluster), minlength=k).min() > 0
  assert int(np.asarray(im2cluster).max()) < k


def test_padded_concentration_equals_concentration():
  rng = np.random.default_rng(3)
  k = 37
  im2cluster = rng.integers(0, k - 5, 400)  # the last clusters empty, some maybe singletons
  im2cluster[:3] = k - 2  # a singleton-free small cluster
  sq_dist = rng.uniform(0.0, 2.0, 400).astype(np.float32)
  want = clustering.concentration(jnp.asarray(sq_dist), jnp.asarray(im2cluster), k, 0.2)
  got = levels._padded_concentration(jnp.asarray(sq_dist), jnp.asarray(im2cluster), k, 0.2,
                                         num_segments=128)
  np.testing.assert_allclose(np.asarray(got)[:k], np.asarray(want), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(want),
                             reference_density(im2cluster, k, sq_dist, 0.2), rtol=1e-5)


# Each case pads to its own rows, so that its k-means program is new to this process.
@pytest.mark.parametrize('kind, rows', [('flat', 40), ('hierarchical', 48)])
def test_padded_levels_equal_exact_levels_in_one_program(kind, rows):
  x = overlapping_points(600)
  exact = clustering.cluster_levels(x, [30, 10], **level_options(levels=kind))
  compiled = jax_kmeans.compilations()
  padded = clustering.cluster_levels(x, [30, 10], **level_options(levels=kind), pad_rows=rows)
  # Both levels, the hierarchical one clustering 30 centroids, share one k-means program.
  assert jax_kmeans.compilations() - compiled == 1
  for want, got in zip(exact, padded):
    k = want['k']
    assert got['centroids'].shape == (k, x.shape[1]) and got['concentration'].shape == (k,)
    np.testing.assert_array_equal(np.asarray(got['im2cluster']), np.asarray(want['im2cluster']))
    np.testing.assert_allclose(np.asarray(got['centroids']), np.asarray(want['centroids']),
                               atol=1e-6)
    np.testing.assert_allclose(np.asarray(got['concentration']),
                               np.asarray(want['concentration']), rtol=1e-5)
    _, sq_dist = numpy_assignment(x, np.asarray(got['centroids']))
    im2cluster = np.asarray(got['im2cluster'])
    reference = reference_density(im2cluster, k, sq_dist[np.arange(x.shape[0]), im2cluster], 0.2)
    np.testing.assert_allclose(np.asarray(got['concentration']), reference, rtol=1e-4)


# ----------------------------------------------------------------------------------------------
# Levels.


def level_options(**overrides):
  options = dict(backend='jax', niter=5, nredo=1, seed=0, spherical=True, levels='flat',
                 temperature=0.2, use_float16=True)
  options.update(overrides)
  return options


def test_flat_levels_shapes_and_concentration():
  x = overlapping_points(600)
  levels = clustering.cluster_levels(x, [30, 10], **level_options())
  assert [level['k'] for level in levels] == [30, 10]
  for level in levels:
    k = level['k']
    assert level['centroids'].shape == (k, x.shape[1])
    assert level['im2cluster'].shape == (x.shape[0],) and level['im2cluster'].dtype == jnp.int32
    np.testing.assert_allclose(np.linalg.norm(np.asarray(level['centroids']), axis=1), 1.0,
                               atol=1e-6)
    _, sq_dist = numpy_assignment(x, np.asarray(level['centroids']))
    im2cluster = np.asarray(level['im2cluster'])
    want = reference_density(im2cluster, k, sq_dist[np.arange(x.shape[0]), im2cluster], 0.2)
    np.testing.assert_allclose(np.asarray(level['concentration']), want, rtol=1e-4)
    assert level['timing_s'] > 0


@pytest.mark.parametrize('backend', BACKENDS)
def test_hierarchical_coarse_label_is_parent_of_fine_label(backend):
  x = overlapping_points(600)
  with warnings.catch_warnings():
    warnings.simplefilter('error')  # A ratio of 3 does not warn.
    levels = clustering.cluster_levels(x, [30, 10], **level_options(backend=backend,
                                                                    levels='hierarchical'))
  for fine, coarse in zip(levels, levels[1:]):
    fine_labels, coarse_labels = np.asarray(fine['im2cluster']), np.asarray(coarse['im2cluster'])
    for cluster in np.unique(fine_labels):
      assert np.unique(coarse_labels[fine_labels == cluster]).size == 1
    # The parent is the coarse centroid nearest to the fine centroid.
    parent, _ = numpy_assignment(np.asarray(fine['centroids']), np.asarray(coarse['centroids']))
    np.testing.assert_array_equal(parent[fine_labels], coarse_labels)


def test_hierarchical_warns_on_small_ratio():
  x = overlapping_points(600)
  with pytest.warns(UserWarning, match='ratio'):
    clustering.cluster_levels(x, [30, 27], **level_options(levels='hierarchical'))


@pytest.mark.parametrize('ks', [[10, 10], [10, 20], [20, 10, 15]])
def test_hierarchical_rejects_non_decreasing_counts(ks):
  with pytest.raises(ValueError, match='strictly decreasing'):
    clustering.cluster_levels(overlapping_points(100), ks,
                              **level_options(levels='hierarchical'))


def test_hierarchical_rejects_level_larger_than_non_empty_parents():
  # Five distinct points: at most five of the 30 fine clusters can be non-empty.
  x = np.repeat(overlapping_points(5), 120, axis=0)
  with pytest.raises(ValueError, match='non-empty centroids'):
    clustering.cluster_levels(x, [30, 10], **level_options(levels='hierarchical'))


# ----------------------------------------------------------------------------------------------
# Errors.


@pytest.mark.parametrize('k, message', [
    (0, 'schedule.all_clusters contains k=0; every cluster count must be >= 1'),
    (13, 'schedule.all_clusters contains k=13 but only N=12 samples; use a k <= N'),
])
def test_bad_k(k, message):
  with pytest.raises(ValueError, match=message):
    clustering.kmeans(overlapping_points(12, 4), k)
  with pytest.raises(ValueError, match=message):
    clustering.cluster_levels(overlapping_points(12, 4), [k], **level_options())


def test_unknown_backend():
  with pytest.raises(ValueError, match="clustering.backend='x' is unknown; use auto, faiss or jax"):
    clustering.kmeans(overlapping_points(12, 4), 2, backend='x')
  with pytest.raises(ValueError, match='unknown'):
    clustering.resolve_backend('gpu')


@pytest.mark.parametrize('bad', [np.nan, np.inf])
def test_non_finite_features(bad):
  x = overlapping_points(12, 4)
  x[3, 1] = bad
  with pytest.raises(ValueError, match='features contain NaN/inf; k-means refuses them'):
    clustering.kmeans(x, 2, backend='jax')


def test_bad_iteration_counts():
  with pytest.raises(ValueError, match='nredo >= 1'):
    clustering.kmeans(overlapping_points(12, 4), 2, nredo=0)


def test_bad_weights_and_init():
  x = overlapping_points(12, 4)
  with pytest.raises(ValueError, match='weights'):
    clustering.kmeans(x, 2, weights=-np.ones(12))
  with pytest.raises(ValueError, match='init_centroids'):
    clustering.kmeans(x, 2, init_centroids=x[:3])


def test_faiss_torch_dlpack_bridge_on_cpu():
  # The faiss-gpu final search hands device features to faiss through torch over DLPack; the
  # same bridge works with CPU tensors and a CPU index, which is what this machine can check.
  pytest.importorskip('torch')
  faiss = pytest.importorskip('faiss')
  x, init = separated_blobs()
  index = faiss.IndexFlatL2(x.shape[1])
  index.add(init)
  labels = faiss_kmeans.nearest(index, jnp.asarray(x), x, on_gpu=True)
  assert labels.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(labels), numpy_assignment(x, init)[0])


# ----------------------------------------------------------------------------------------------
# Slow and GPU-only checks.


@pytest.mark.slow
def test_jax_backend_at_training_scale():
  x = unit_rows(np.random.default_rng(0).standard_normal((60000, 128)))
  centroids, im2cluster, sq_dist = clustering.kmeans(x, 3200, backend='jax', niter=2, nredo=1)
  assert centroids.shape == (3200, 128)
  assert np.isfinite(np.asarray(sq_dist)).all()
  assert int(jnp.max(im2cluster)) < 3200


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != 'gpu', reason='needs JAX on a GPU')
def test_jax_backend_on_gpu_matches_faiss_cpu():
  x, init = separated_blobs(num_per_blob=200, num_blobs=16, dim=32)
  on_gpu = clustering.kmeans(jnp.asarray(x), 16, backend='jax', niter=10, init_centroids=init)
  faiss_cpu = clustering.kmeans(x, 16, backend='faiss-cpu', niter=10, init_centroids=init)
  np.testing.assert_array_equal(np.asarray(on_gpu[1]), np.asarray(faiss_cpu[1]))
  np.testing.assert_allclose(np.asarray(on_gpu[0]), np.asarray(faiss_cpu[0]), atol=1e-5)
  assert clustering.resolve_backend('auto') in ('faiss-gpu', 'jax')
