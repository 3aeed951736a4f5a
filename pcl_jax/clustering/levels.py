"""The E-step's clustering levels and PCL's concentration (DESIGN.md section 1, steps 2-4).

This module owns k-means once per active level (`clustering.levels`: flat; hierarchical, where
level l+1 clusters the centroids of level l, so a sample's coarse cluster is the parent of its
fine one; or balanced, flat levels made equal-sized by `balanced.rebalance`) and the
concentration phi of each cluster. It takes features in and gives centroids, assignments and
concentrations back as device arrays; it never touches model parameters, the optimizer, the data
pipeline or the cluster-count schedule (which levels are active is the caller's decision).
"""

import functools
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from pcl_jax.clustering import backend as kmeans_backend
from pcl_jax.clustering import balanced as balanced_lib
from pcl_jax.clustering import faiss_kmeans
from pcl_jax.clustering import jax_kmeans
from pcl_jax import models

# Cluster-count ratio between hierarchical levels below which the notes saw harm.
_MIN_HIERARCHY_RATIO = 1.2


@jax.jit(static_argnums=(2,))
def concentration(sq_dist, im2cluster, k, temperature):
  """Per-cluster concentration phi of PCL (the reference's and the notes' formula, exactly).

  phi_c = mean(sqrt(d_i)) / log(n_c + 10) over the n_c members of c when n_c > 1; clusters with
  n_c <= 1 get the largest phi (or 0 when none has two members, as the reference); clip to the
  10th..90th percentile of the k values (numpy's linear interpolation); then
  phi = temperature * phi / mean(phi). One deviation: where the reference divides 0 by 0 (every
  cluster has <= 1 member) every phi is `temperature` instead of NaN. Jitted, k static.

  Args:
    sq_dist: [N] squared distance of each sample to its cluster's centroid.
    im2cluster: [N] int cluster of each sample.
    k: number of clusters (static).
    temperature: the ProtoNCE temperature.
  Returns:
    [k] float32 concentrations.
  """
  return _concentration(sq_dist, im2cluster, k, temperature, num_segments=k)


@jax.jit(static_argnames=('num_segments',))
def _padded_concentration(sq_dist, im2cluster, k, temperature, *, num_segments):
  """`concentration` computed over `num_segments` >= k clusters (`jax_kmeans.Padding`), k
  traced, so the cluster counts of a padded run share one compilation; returns [num_segments], the
  first k entries the concentrations."""
  return _concentration(sq_dist, im2cluster, k, temperature, num_segments=num_segments)


def _concentration(sq_dist, im2cluster, k, temperature, *, num_segments):
  """`concentration`'s formula over `num_segments` clusters, of which the first k (an int or a
  traced scalar) are real: the others have no members and take no part in the percentiles or
  the mean."""
  sq_dist = jnp.asarray(sq_dist, jnp.float32)
  real = jnp.arange(num_segments) < k
  size = jax.ops.segment_sum(jnp.ones_like(sq_dist), im2cluster, num_segments=num_segments)
  dist_sum = jax.ops.segment_sum(jnp.sqrt(sq_dist), im2cluster, num_segments=num_segments)
  populated = size > 1
  # phi >= 0, and padding rows (never populated) hold 0, so they cannot raise the max.
  phi = jnp.where(populated, dist_sum / jnp.maximum(size, 1.0) / jnp.log(size + 10.0), 0.0)
  phi = jnp.where(populated, phi, jnp.max(phi))
  # Padding sorts last, so the first k sorted values are the real ones.
  ascending = jnp.sort(jnp.where(real, phi, jnp.inf))
  phi = jnp.clip(phi, _linear_percentile(ascending, k, 10.0),
                 _linear_percentile(ascending, k, 90.0))
  mean = jnp.sum(jnp.where(real, phi, 0.0)) / jnp.asarray(k, jnp.float32)
  return jnp.where(mean > 0, temperature * phi / jnp.where(mean > 0, mean, 1.0),
                   jnp.full_like(phi, temperature))


def _linear_percentile(ascending, count, percent: float):
  """numpy's default ('linear') percentile of the first `count` entries of an ascending array,
  `count` an int or a traced scalar; the float32 operations of `jnp.percentile`, so with
  count = len(ascending) the same value bit for bit."""
  position = jnp.float32(percent / 100) * (jnp.asarray(count, jnp.float32) - 1)
  low, high = jnp.floor(position), jnp.ceil(position)
  high_weight = position - low
  low_weight = 1 - high_weight
  last = jnp.asarray(count, jnp.float32) - 1
  low = jnp.clip(low, 0, last).astype(jnp.int32)
  high = jnp.clip(high, 0, last).astype(jnp.int32)
  return ascending[low] * low_weight + ascending[high] * high_weight


# ----------------------------------------------------------------------------------------------
# Levels (flat, hierarchical or balanced).


def _check_hierarchy(num_clusters):
  for fine, coarse in zip(num_clusters, num_clusters[1:]):
    if coarse >= fine:
      raise ValueError(f"clustering.levels='hierarchical' needs strictly decreasing cluster "
                       f'counts, got {list(num_clusters)}; order schedule.all_clusters fine to '
                       "coarse or set clustering.levels='flat'")
    if fine / coarse < _MIN_HIERARCHY_RATIO:
      message = (f'hierarchical levels k={fine} -> k={coarse} differ by a ratio of '
                 f'{fine / coarse:.2f} < {_MIN_HIERARCHY_RATIO}; the notes found that ratio '
                 'harmful (coarse levels clustered from too few centroids)')
      warnings.warn(message, stacklevel=3)


def _level_concentration(sq_dist, im2cluster, k: int, temperature, padding):
  """`concentration`, over `padding.centroids` clusters when the run pads."""
  if padding is None or padding.centroids <= k:
    return concentration(sq_dist, im2cluster, k, temperature)
  return _padded_concentration(sq_dist, im2cluster, k, temperature,
                               num_segments=padding.centroids)[:k]


def config_settings(config) -> dict:
  """`cluster_levels`' keyword settings from a run config: the run's `clustering.*` and PCL's
  temperature (the E-step's, and the evaluation's re-clustering of the run's levels)."""
  settings = config.clustering
  return dict(backend=settings.backend, niter=settings.niter, nredo=settings.nredo,
              spherical=settings.spherical, temperature=config.pcl.temperature,
              use_float16=settings.use_float16, levels=settings.levels,
              max_points_factor=settings.max_points_factor,
              min_points_factor=settings.min_points_factor,
              sinkhorn_epsilon=settings.sinkhorn_epsilon,
              sinkhorn_iterations=settings.sinkhorn_iterations)


def cluster_levels(features, num_clusters, *, backend, niter, nredo, seed, spherical,
                   temperature, use_float16, levels='flat', max_points_factor=5 / 3,
                   min_points_factor=1 / 3, sinkhorn_epsilon=0.05, sinkhorn_iterations=3,
                   pad_rows=None):
  """Runs the E-step clustering for every active level; host-side driver.

  'flat': each level clusters the samples independently, with seed `seed + level`.
  'hierarchical' (strictly decreasing k): level 0 clusters the samples; level l+1 clusters
  level l's non-empty centroids weighted by their member counts, and every level-l centroid
  (empty ones included) gets its nearest level-(l+1) centroid as parent; then
  im2cluster_{l+1} = parent[im2cluster_l], so a sample's coarse cluster is always the parent
  of its fine one, and its distance (for the concentration) is to that coarse centroid.
  'balanced': flat levels whose k-means clusters are then made equal-sized
  (`balanced.rebalance`: Sinkhorn-Knopp assignments, member-mean centroids; a coarse level of a
  hierarchy is a union of fine clusters, so its sizes could not be set).
  Concentrations come from the sample distances to the un-normalised centroids (as the
  reference); the returned centroids are then L2-normalised, as the reference normalises its
  prototypes (a no-op up to rounding when spherical).

  Args:
    features: [N, D] L2-normalised sample features.
    num_clusters: the active levels' cluster counts, in order.
    backend: 'auto', 'faiss' or 'jax'.
    niter: k-means iterations.
    nredo: k-means restarts.
    seed: base seed; level l uses seed + l.
    spherical: spherical k-means.
    temperature: ProtoNCE temperature (scales the concentrations).
    use_float16: faiss-gpu index storage.
    levels: 'flat', 'hierarchical' or 'balanced' (`clustering.levels`).
    max_points_factor: max_points_per_centroid = int(n * factor / k), n = points clustered.
    min_points_factor: min_points_per_centroid = int(n * factor / k).
    sinkhorn_epsilon: the balanced assignments' entropy weight.
    sinkhorn_iterations: their Sinkhorn-Knopp iterations.
    pad_rows: the jax backend's centroid rows for every level (`jax_kmeans.padded_rows`: the
      run's largest k under `clustering.pad_k`), None for exact k. Points are padded to the N
      features too (a hierarchical level clusters fewer centroids), so every level's k-means is
      one program.
  Returns:
    One dict per level, in order: {'k', 'centroids' [k, D], 'im2cluster' [N] int32,
    'concentration' [k], 'timing_s'}.
  Raises:
    ValueError: bad cluster counts (see `kmeans`), non-decreasing counts in hierarchical mode,
      or a level with more clusters than its parent level has non-empty centroids.
  """
  features = jnp.asarray(features, jnp.float32)
  num_clusters = [int(k) for k in num_clusters]
  if kmeans_backend.resolve_backend(backend) != 'jax':
    # Once for every level: the levels' k-means and distances then share one device.
    features = faiss_kmeans.on_one_device(features)
  num_samples = features.shape[0]
  for k in num_clusters:
    kmeans_backend.check_k(k, num_samples)
  hierarchical = levels == 'hierarchical'
  if hierarchical:
    _check_hierarchy(num_clusters)
  padding = None if pad_rows is None else jax_kmeans.Padding(pad_rows, num_samples)

  def run_kmeans(points, k, level, weights=None):
    per_centroid = functools.partial(kmeans_backend.points_per_centroid, points.shape[0], k)
    return kmeans_backend.kmeans(
        points, k, backend=backend, niter=niter, nredo=nredo, seed=seed + level,
        spherical=spherical, use_float16=use_float16, weights=weights,
        max_points_per_centroid=per_centroid(max_points_factor),
        min_points_per_centroid=per_centroid(min_points_factor), padding=padding)

  results = []
  finer = None  # (centroids, im2cluster) of the previous level in hierarchical mode.
  for level, k in enumerate(num_clusters):
    start = time.perf_counter()
    if finer is None:
      centroids, im2cluster, sq_dist = run_kmeans(features, k, level)
      if levels == 'balanced':
        centroids, im2cluster, sq_dist = balanced_lib.rebalance(
            features, centroids, epsilon=sinkhorn_epsilon, iterations=sinkhorn_iterations,
            spherical=spherical)
    else:
      fine_centroids, fine_im2cluster = finer
      member_count = jnp.bincount(fine_im2cluster, length=fine_centroids.shape[0])
      populated = np.flatnonzero(np.asarray(member_count) > 0)
      if k > populated.size:
        raise ValueError(
            f'hierarchical level k={k} exceeds the {populated.size} non-empty centroids of the '
            f'level above (k={fine_centroids.shape[0]}); use fewer clusters at this level or set '
            "clustering.levels='flat'")
      centroids, _, _ = run_kmeans(fine_centroids[populated], k, level,
                                   weights=member_count[populated])
      parent, _ = jax_kmeans.assign_to_centroids(fine_centroids, centroids)
      im2cluster = parent[fine_im2cluster]
      sq_dist = jax_kmeans.sq_dist_to_assigned(features, centroids, im2cluster)
    phi = _level_concentration(sq_dist, im2cluster, k, temperature, padding)
    if hierarchical:
      finer = (centroids, im2cluster)
    normalized = models.l2_normalize(centroids)
    jax.block_until_ready((normalized, phi))
    results.append({'k': k, 'centroids': normalized, 'im2cluster': im2cluster.astype(jnp.int32),
                    'concentration': phi, 'timing_s': time.perf_counter() - start})
  return results
