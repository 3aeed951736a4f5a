"""Pure-JAX k-means, a step-by-step mirror of faiss's `Clustering::train` (the `jax` backend).

This module owns the k-means that runs wherever XLA does (TPU, GPU without faiss-gpu, sharded
over many devices): subsample the training set to `k * max_points_per_centroid` points when
larger; for each of `nredo` runs, initialise with k distinct random points (seeded by `seed`
and the run), run `niter` iterations (assign with the squared L2 distance, weighted-mean update,
split empty clusters, renormalise when spherical) and keep the run whose last-iteration
objective (sum of squared L2 distances, also when spherical: faiss's assignment index is an L2
index) is lowest. Assignment is chunked so memory is `chunk x k`. Its random streams are JAX's,
not faiss's, so the two backends agree exactly only from the same `init_centroids`.

Compilation: the k-means and the concentration compile once per shape, and k fixes their
shapes. On an accelerator one compilation took 10-15 s, and over 85 s for the notes' first counts
(3200, 2400, 1600; measured on an H200), so a run can compute every cluster count with one
program: `clustering.pad_k` (`padded_rows`) gives every k-means of the run the run's largest k
as its centroid rows and the run's N features as its point rows (`Padding`). Padding centroid
rows never win an assignment, are never split into and are cut off before any result leaves;
padding points weigh nothing, are never drawn as initial centroids and count in no objective.
The random draws are JAX's counter-based ones, whose first k (or n) values do not depend on the
padded length, so the result is the one exact k gives, to float rounding. On the CPU `auto`
keeps exact k: a compilation costs ~2 s there and the padding's extra matmul work costs more
(benchmarks/kmeans_padding.py).
"""

import logging
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from pcl_jax import models

# faiss's split_clusters perturbation, "a bit above machine epsilon for float16".
_SPLIT_EPS = 1.0 / 1024.0
# Elements of one [chunk, k] distance block. On CPU a block that stays in cache is fastest
# (measured in benchmarks/clustering.py); accelerators want large blocks to fill the chip.
_CPU_BLOCK_ELEMENTS = 1 << 20
_ACCELERATOR_BLOCK_ELEMENTS = 1 << 25
_MAX_CHUNK_ROWS = 8192


def _chunk_rows(num_points: int, k: int) -> int:
  """Rows per assignment block so that one [chunk, k] distance block stays small."""
  budget = _CPU_BLOCK_ELEMENTS if jax.default_backend() == 'cpu' else _ACCELERATOR_BLOCK_ELEMENTS
  rows = max(128, min(_MAX_CHUNK_ROWS, budget // k))
  # No point in a chunk larger than the (8-aligned) data.
  return min(rows, -(-num_points // 8) * 8)


class Padding(NamedTuple):
  """The shapes every k-means of a run computes with (module docstring, "Compilation")."""
  centroids: int  # centroid rows: the run's largest k
  points: int  # point rows: the run's N features


def padded_rows(pad_k: str, max_k: int) -> Optional[int]:
  """The centroid rows of every k-means of a run under `clustering.pad_k`, None for exact k.

  'max' pads to the run's largest k (`max_k`); 'exact' never pads; 'auto' pads on accelerators
  (GPU, TPU), where a compilation costs far more than the padding's arithmetic, not on the CPU.
  """
  if pad_k == 'max' or (pad_k == 'auto' and jax.default_backend() != 'cpu'):
    return max_k
  return None


def _pad_to_chunks(x, chunk: int):
  """Zero-pads the rows of x to a multiple of `chunk` (rows stay rows; traced under jit)."""
  pad = (-x.shape[0]) % chunk
  return jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1))


def _assign_block(x_block, centroids, centroid_sq_norm):
  """Nearest centroid of each row and its squared L2 distance, for one [chunk, D] block.

  Distances expand as ||x||^2 - 2 x.c + ||c||^2 (one matmul, like faiss's IndexFlatL2), at
  HIGHEST precision: on GPUs the default would round the matmul to TF32 and flip near ties; on
  CPU it costs nothing. ||x||^2 is constant along a row, so it is added after the argmin. The
  argmin is a min followed by the first index attaining it: two plain reductions, which XLA
  vectorises, instead of one variadic (value, index) reduction, which it does not on CPU.
  """
  k = centroids.shape[0]
  partial_dist = centroid_sq_norm[None, :] + jnp.dot(
      x_block, -2.0 * centroids.T, precision=jax.lax.Precision.HIGHEST)
  best = jnp.min(partial_dist, axis=1)
  cluster_ids = jnp.arange(k, dtype=jnp.int32)[None, :]
  im2cluster = jnp.min(jnp.where(partial_dist == best[:, None], cluster_ids, k), axis=1)
  # Round-off can make the expansion slightly negative for a point sitting on its centroid.
  sq_dist = jnp.maximum(jnp.sum(x_block * x_block, axis=1) + best, 0.0)
  return im2cluster, sq_dist


def _assign_chunks(padded_x, centroids, chunk, centroid_valid):
  """Assignment of padded rows, `chunk` at a time so memory stays chunk x k. Returns flat [N].

  Centroid rows where `centroid_valid` is False (padding up to `Padding.centroids`) get an
  infinite norm, so their distance is infinite and they never win.
  """
  centroid_sq_norm = jnp.where(centroid_valid, jnp.sum(centroids * centroids, axis=1), jnp.inf)
  x_chunks = padded_x.reshape(-1, chunk, padded_x.shape[1])
  im2cluster, sq_dist = jax.lax.map(
      lambda block: _assign_block(block, centroids, centroid_sq_norm), x_chunks)
  return im2cluster.reshape(-1), sq_dist.reshape(-1)


@jax.jit
def sq_dist_to_assigned(x, centroids, im2cluster):
  """Squared L2 distance of each row of x to its assigned centroid, computed directly.

  Direct differences instead of the matmul expansion: no cancellation, so small distances (the
  ones concentration takes square roots of) keep their relative precision. Jitted.

  Args:
    x: [N, D] samples.
    centroids: [k, D].
    im2cluster: [N] int assignment.
  Returns:
    [N] float32 squared distances.
  """
  diff = x - centroids[im2cluster]
  return jnp.sum(diff * diff, axis=1)


@jax.jit(static_argnames=('chunk',))
def _assign(x, centroids, num_valid, *, chunk):
  """Nearest of the first `num_valid` centroids (int32) and the direct squared distance to it,
  for every row of x. Jitted; num_valid is traced (padded centroids: `Padding`)."""
  centroid_valid = jnp.arange(centroids.shape[0]) < num_valid
  im2cluster, _ = _assign_chunks(_pad_to_chunks(x, chunk), centroids, chunk, centroid_valid)
  im2cluster = im2cluster[:x.shape[0]]
  return im2cluster, sq_dist_to_assigned(x, centroids, im2cluster)


def assign_to_centroids(x, centroids, num_valid=None):
  """Each row's nearest centroid and squared L2 distance to it (chunked, jitted search).

  Args:
    x: [N, D] float32 samples.
    centroids: [k, D] float32.
    num_valid: only the first num_valid centroids compete (padded centroids, `Padding`);
      default all k.
  Returns:
    (im2cluster [N] int32, sq_dist [N] float32).
  """
  x = jnp.asarray(x, jnp.float32)
  centroids = jnp.asarray(centroids, jnp.float32)
  k = centroids.shape[0]
  return _assign(x, centroids, k if num_valid is None else num_valid,
                 chunk=_chunk_rows(x.shape[0], k))


def _split_empty_clusters(centroids, cluster_weight, uniform, centroid_valid=None):
  """faiss's split_clusters: every empty cluster takes over half of a non-empty one.

  Empty clusters are handled in index order. Each copies a donor centroid chosen with
  probability proportional to (size - 1) (faiss draws it the same way, by a cyclic scan), the
  pair gets the symmetric perturbation (1 +/- EPS, alternating by dimension) that separates
  them, and the donor's size is split evenly so later draws see the halves. Loops only over the
  empty clusters (a while_loop), so it is free when there are none.

  Args:
    centroids: [k, D] updated centroids (empty clusters' rows are zero).
    cluster_weight: [k] summed member weights (0 = empty).
    uniform: [k] uniform [0, 1) draws, one per possible split (drawn outside the loop: a PRNG
      inside the while_loop would double the compile time for nothing).
    centroid_valid: optional [k] bool, False for padding rows (`Padding`): never filled, and
      with weight 0 never a donor either.
  Returns:
    (centroids, cluster_weight, number of splits).
  """
  dim = centroids.shape[1]
  perturbation = _SPLIT_EPS * jnp.where(jnp.arange(dim) % 2 == 0, 1.0, -1.0)
  if centroid_valid is None:
    centroid_valid = jnp.ones(centroids.shape[:1], bool)

  def has_work(state):
    _, weight, _ = state
    # A donor needs size > 1; without one faiss would loop forever, we stop.
    return jnp.any((weight == 0) & centroid_valid) & jnp.any(weight > 1)

  def split_one(state):
    centroids, weight, num_splits = state
    empty = jnp.argmax((weight == 0) & centroid_valid)
    # Inverse-CDF draw of the donor, proportional to size - 1.
    cumulative = jnp.cumsum(jnp.maximum(weight - 1.0, 0.0))
    target = uniform[num_splits] * cumulative[-1]
    donor = jnp.minimum(jnp.searchsorted(cumulative, target, side='right'), weight.shape[0] - 1)
    donor_centroid = centroids[donor]
    centroids = centroids.at[empty].set(donor_centroid * (1.0 + perturbation))
    centroids = centroids.at[donor].set(donor_centroid * (1.0 - perturbation))
    half = weight[donor] / 2.0
    weight = weight.at[empty].set(half).at[donor].set(weight[donor] - half)
    return centroids, weight, num_splits + 1

  centroids, cluster_weight, num_splits = jax.lax.while_loop(
      has_work, split_one, (centroids, cluster_weight, jnp.int32(0)))
  return centroids, cluster_weight, num_splits


def _lloyd(padded_x, padded_weights, valid, centroids, centroid_valid, niter, key, *, chunk,
           spherical):
  """One k-means run: `niter` Lloyd iterations from `centroids`, in faiss's order.

  Args:
    padded_x: [M, D] training points, zero-padded to a multiple of `chunk` rows.
    padded_weights: [M] point weights, 0 for padding.
    valid: [M] bool, False for padding.
    centroids: [k, D] initial centroids (already normalised when spherical).
    centroid_valid: [k] bool, False for padding rows (`Padding`; zero, and kept so).
    niter: number of iterations (traced).
    key: PRNG key for the empty-cluster splits.
    chunk: rows per assignment block.
    spherical: renormalise centroids after each update.
  Returns:
    (centroids [k, D], objective of the last iteration (0 without iterations, as faiss),
    total number of splits).
  """
  k = centroids.shape[0]
  weighted_x = padded_x * padded_weights[:, None]

  def iteration(i, carry):
    centroids, _, num_splits = carry
    # Step 1: assign; faiss's objective is the plain sum of the distances of this assignment.
    im2cluster, sq_dist = _assign_chunks(padded_x, centroids, chunk, centroid_valid)
    objective = jnp.sum(jnp.where(valid, sq_dist, 0.0))
    # Step 2: weighted means (padding has weight 0, so it moves nothing).
    cluster_weight = jax.ops.segment_sum(padded_weights, im2cluster, num_segments=k)
    cluster_sum = jax.ops.segment_sum(weighted_x, im2cluster, num_segments=k)
    safe_weight = jnp.where(cluster_weight > 0, cluster_weight, 1.0)
    updated = jnp.where(cluster_weight[:, None] > 0, cluster_sum / safe_weight[:, None], 0.0)
    # Step 3: empty clusters, then the spherical projection (faiss's post_process_centroids).
    # JAX's counter-based draws: the first k of these do not depend on the padded length.
    uniform = jax.random.uniform(jax.random.fold_in(key, i), (k,))
    updated, _, splits = _split_empty_clusters(updated, cluster_weight, uniform, centroid_valid)
    if spherical:
      updated = models.l2_normalize(updated)
    return updated, objective, num_splits + splits

  init = (centroids, jnp.float32(0.0), jnp.int32(0))
  return jax.lax.fori_loop(0, niter, iteration, init)


@jax.jit(static_argnames=('k', 'chunk', 'spherical'))
def _best_of_runs(x, weights, init_centroids, niter, num_runs, key, num_valid, num_points, *, k,
                  chunk, spherical):
  """`num_runs` k-means runs; keeps the one with the lowest last-iteration objective.

  Run r initialises with `num_valid` distinct random points drawn from fold_in(key, r + 1) (or
  with `init_centroids`). Jitted once per (M, D, k) shape, `spherical` and whether
  `init_centroids` is given; `niter`, `num_runs`, the key, `num_valid` and `num_points` are
  traced, so no recompiles across seeds, restarts or the cluster counts and point counts that
  share a `Padding`, and the whole search stays on device.

  Args:
    x: [M, D] training points, the first `num_points` real, the rest padding (`Padding`).
    weights: [M] point weights, 0 for padding (`kmeans` pads them so).
    init_centroids: [k, D] or None.
    niter: Lloyd iterations per run.
    num_runs: number of runs.
    key: PRNG key.
    num_valid: the real number of clusters; rows from it to k are padding.
    num_points: the real number of points.
    k: number of centroid rows (static).
    chunk: rows per assignment block.
    spherical: spherical k-means.
  Returns:
    [k, D] centroids of the best run, zero from row num_valid on.
  """
  dim = x.shape[1]
  padded_x = _pad_to_chunks(x, chunk)
  padded_weights = _pad_to_chunks(weights, chunk)
  valid = jnp.arange(padded_x.shape[0]) < num_points
  centroid_valid = jnp.arange(k) < num_valid

  def one_run(redo, best):
    best_centroids, best_objective = best
    init_key, split_key = jax.random.split(jax.random.fold_in(key, redo + 1))
    if init_centroids is None:
      # k distinct points in random order: the first k of a random permutation (as faiss), drawn
      # as the top k of N uniforms, which compiles and runs faster than a full shuffle (and
      # whose first num_valid are the top num_valid). Padding points are never drawn first.
      uniform = jnp.where(valid[:x.shape[0]], jax.random.uniform(init_key, (x.shape[0],)), -1.0)
      _, first_k = jax.lax.top_k(uniform, k)
      start = jnp.where(centroid_valid[:, None], x[first_k], 0.0)
    else:
      start = init_centroids
    if spherical:
      start = models.l2_normalize(start)
    centroids, objective, _ = _lloyd(padded_x, padded_weights, valid, start, centroid_valid,
                                     niter, split_key, chunk=chunk, spherical=spherical)
    # Strictly better only, as faiss: on a tie the earlier run stays.
    improved = objective < best_objective
    return (jnp.where(improved, centroids, best_centroids),
            jnp.where(improved, objective, best_objective))

  best = (jnp.zeros((k, dim), jnp.float32), jnp.float32(jnp.inf))
  return jax.lax.fori_loop(0, num_runs, one_run, best)[0]


def compilations() -> int:
  """How many k-means programs this process has compiled (one per distinct shape; with a
  `Padding`, one for every cluster count of a run)."""
  return _best_of_runs._cache_size()  # pylint: disable=protected-access


def kmeans(x, k, *, niter, nredo, seed, spherical, max_points, min_points, weights,
           init_centroids, padding: Optional[Padding] = None):
  """Pure-JAX k-means (see the module docstring); returns centroids [K, D], K = k, or
  `padding.centroids` with a padding, whose first k rows are the centroids and the rest zero."""
  num_points = x.shape[0]
  base_key = jax.random.PRNGKey(seed)
  if weights is None:
    weights = jnp.ones((num_points,), jnp.float32)
  # Same subsampling rule as faiss (a seeded random subset of k * max_points points).
  if num_points > k * max_points:
    subset = jax.random.permutation(jax.random.fold_in(base_key, 0), num_points)[:k * max_points]
    x, weights = x[subset], weights[subset]
  elif num_points < k * min_points:
    logging.warning('clustering %d points to %d centroids: please provide at least %d training '
                    'points', num_points, k, k * min_points)
  num_points = x.shape[0]
  if num_points == k and init_centroids is None:
    # faiss's corner case: every point is its own centroid, no iteration.
    return models.l2_normalize(x) if spherical else x
  rows, length = k, num_points
  if padding is not None:
    length = max(num_points, padding.points)
    rows = min(max(k, padding.centroids), length)
    x = jnp.pad(x, ((0, length - num_points), (0, 0)))
    weights = jnp.pad(weights, (0, length - num_points))
  if init_centroids is not None:
    init_centroids = jnp.asarray(init_centroids, jnp.float32)
    init_centroids = jnp.pad(init_centroids, ((0, rows - k), (0, 0)))
  # With given initial centroids there is one run: faiss starts every redo after the first from
  # the previous run's result, which is no restart at all.
  num_runs = 1 if init_centroids is not None else nredo
  return _best_of_runs(x, weights, init_centroids, niter, num_runs, base_key, k, num_points,
                       k=rows, chunk=_chunk_rows(length, rows), spherical=spherical)
