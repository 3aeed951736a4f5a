"""The E-step's clustering: k-means backends, hierarchical levels and cluster concentration.

This module owns DESIGN.md section 1 steps 2-4 (k-means per level, the hierarchical mode, the
concentration formula) and the "Clustering backends" of section 2: `faiss` (faiss.Clustering,
with a GPU index when one exists), `jax` (a pure-JAX mirror of faiss's k-means) and `auto`. It
takes features in and gives centroids, assignments and concentrations back as device arrays; it
never touches model parameters, the optimizer, the data pipeline or the cluster-count schedule
(which levels are active is the caller's decision).

The `jax` backend follows faiss's `Clustering::train` step by step so the two agree: subsample
the training set to `k * max_points_per_centroid` points when larger; for each of `nredo` runs,
initialise with k distinct random points (seeded by `seed` and the run), run `niter` iterations
(assign with the squared L2 distance, weighted-mean update, split empty clusters, renormalise
when spherical) and keep the run whose last-iteration objective (sum of squared L2 distances,
also when spherical: faiss's assignment index is an L2 index) is lowest; finally assign every
sample to its nearest returned centroid. Its random streams are JAX's, not faiss's, so the two
backends agree exactly only from the same `init_centroids`.

Compilation: the jax k-means and the concentration compile once per cluster count (k fixes
their shapes). On an accelerator that took 10-15 s per count (an H200, session 8), so there
they compute with k rounded up to a multiple of `_ACCELERATOR_K_MULTIPLE` rows (`_padded_k`):
the padding rows never win an assignment, are never split into, and are cut off before any
result leaves; the random draws are JAX's counter-based ones, whose first k values do not depend
on the padded length, so the result is the one unpadded k would give. Every count <= 128 of a
schedule then shares one compilation. On the CPU k is not padded: a compilation costs ~2 s there
and the padding's extra matmul work would cost more.
"""

import fractions
import logging
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

# faiss's split_clusters perturbation, "a bit above machine epsilon for float16".
_SPLIT_EPS = 1.0 / 1024.0
# Elements of one [chunk, k] distance block. On CPU a block that stays in cache is fastest
# (measured in benchmarks/clustering.py); accelerators want large blocks to fill the chip.
_CPU_BLOCK_ELEMENTS = 1 << 20
_ACCELERATOR_BLOCK_ELEMENTS = 1 << 25
_MAX_CHUNK_ROWS = 8192
# Cluster counts the jax k-means computes with: k rounded up to a multiple of this (module
# docstring, "Compilation"); 1 = no padding.
_CPU_K_MULTIPLE = 1
_ACCELERATOR_K_MULTIPLE = 128
# Cluster-count ratio between hierarchical levels below which the notes saw harm.
_MIN_HIERARCHY_RATIO = 1.2

_BACKENDS = ('auto', 'faiss', 'jax', 'faiss-cpu', 'faiss-gpu')


# ----------------------------------------------------------------------------------------------
# Backend selection.


def _import_faiss():
  try:
    import faiss  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return faiss


def _faiss_sees_gpu(faiss) -> bool:
  get_num_gpus = getattr(faiss, 'get_num_gpus', None)
  return get_num_gpus is not None and get_num_gpus() > 0


def resolve_backend(name: str) -> str:
  """Maps a `clustering.backend` setting to the implementation that will run.

  `auto` picks faiss with a GPU index when JAX runs on a GPU and faiss sees one ('faiss-gpu');
  faiss-cpu when JAX runs on the CPU and faiss imports ('faiss-cpu'); the pure-JAX k-means
  otherwise ('jax': TPUs, or a GPU without faiss-gpu, where copying features to the host for
  faiss-cpu would cost more than clustering on the chip). `faiss` is 'faiss-gpu' under the same
  GPU condition, else 'faiss-cpu'. The resolved names are accepted as settings too.

  Args:
    name: 'auto', 'faiss' or 'jax' (or an already resolved 'faiss-cpu' / 'faiss-gpu').
  Returns:
    'faiss-gpu', 'faiss-cpu' or 'jax'.
  Raises:
    ValueError: unknown name, or faiss requested but not installed.
  """
  if name not in _BACKENDS:
    raise ValueError(f"clustering.backend='{name}' is unknown; use auto, faiss or jax")
  if name == 'jax':
    return 'jax'
  faiss = _import_faiss()
  on_gpu = jax.default_backend() == 'gpu'
  if name == 'auto':
    if faiss is None:
      return 'jax'
    if on_gpu:
      return 'faiss-gpu' if _faiss_sees_gpu(faiss) else 'jax'
    return 'faiss-cpu' if jax.default_backend() == 'cpu' else 'jax'
  if faiss is None:
    raise ValueError(f"clustering.backend='{name}' but faiss is not installed; install faiss-cpu "
                     '(or faiss-gpu) or set clustering.backend=jax')
  gpu_ok = on_gpu and _faiss_sees_gpu(faiss)
  if name == 'faiss-gpu' and not gpu_ok:
    raise ValueError("clustering.backend='faiss-gpu' needs JAX on a GPU and a faiss build that "
                     'sees it; use clustering.backend=faiss or auto')
  if name == 'faiss':
    return 'faiss-gpu' if gpu_ok else 'faiss-cpu'
  return name


# ----------------------------------------------------------------------------------------------
# Checks and small helpers.


def _points_per_centroid(num_points: int, k: int, factor: float) -> int:
  """int(num_points * factor / k), exact for rational factors such as 5/3 and 1/3.

  The float product N * (1/3) can land just below an integer and floor one too low; the
  researcher's int(N * 5 / 3 / k) cannot, so the factor is taken as a fraction.
  """
  ratio = fractions.Fraction(factor).limit_denominator(1000)
  return int(num_points * ratio.numerator // (ratio.denominator * k))


def _check_k(k: int, num_points: int):
  if k < 1:
    raise ValueError(f'schedule.all_clusters contains k={k}; every cluster count must be >= 1')
  if k > num_points:
    raise ValueError(f'schedule.all_clusters contains k={k} but only N={num_points} samples; '
                     'use a k <= N')


@jax.jit
def _all_finite(x):
  return jnp.all(jnp.isfinite(x))


def _check_finite(x):
  if not bool(_all_finite(x)):
    raise ValueError('features contain NaN/inf; k-means refuses them')


def _l2_normalize(x):
  """Row-wise L2 normalisation; zero rows stay zero (as faiss's fvec_renorm_L2)."""
  norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
  return x / jnp.where(norm > 0, norm, 1.0)


def _chunk_rows(num_points: int, k: int) -> int:
  """Rows per assignment block so that one [chunk, k] distance block stays small."""
  budget = _CPU_BLOCK_ELEMENTS if jax.default_backend() == 'cpu' else _ACCELERATOR_BLOCK_ELEMENTS
  rows = max(128, min(_MAX_CHUNK_ROWS, budget // k))
  # No point in a chunk larger than the (8-aligned) data.
  return min(rows, -(-num_points // 8) * 8)


def _padded_k(k: int, num_points: int) -> int:
  """Centroid rows the jax k-means computes with for k clusters (the first k are the real ones):
  k rounded up to the platform's multiple, never above the N points the initial draw takes from."""
  multiple = _CPU_K_MULTIPLE if jax.default_backend() == 'cpu' else _ACCELERATOR_K_MULTIPLE
  return max(k, min(num_points, -(-k // multiple) * multiple))


def _pad_to_chunks(x, chunk: int):
  """Zero-pads the rows of x to a multiple of `chunk` (rows stay rows; traced under jit)."""
  pad = (-x.shape[0]) % chunk
  return jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1))


# ----------------------------------------------------------------------------------------------
# Pure-JAX k-means.


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

  Centroid rows where `centroid_valid` is False (padding up to `_padded_k`) get an infinite
  norm, so their distance is infinite and they never win.
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
  for every row of x. Jitted; num_valid is traced (padded centroids: `_padded_k`)."""
  centroid_valid = jnp.arange(centroids.shape[0]) < num_valid
  im2cluster, _ = _assign_chunks(_pad_to_chunks(x, chunk), centroids, chunk, centroid_valid)
  im2cluster = im2cluster[:x.shape[0]]
  return im2cluster, sq_dist_to_assigned(x, centroids, im2cluster)


def assign_to_centroids(x, centroids, num_valid=None):
  """Each row's nearest centroid and squared L2 distance to it (chunked, jitted search).

  Args:
    x: [N, D] float32 samples.
    centroids: [k, D] float32.
    num_valid: only the first num_valid centroids compete (padded centroids, `_padded_k`);
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
    centroid_valid: optional [k] bool, False for padding rows (`_padded_k`): never filled, and
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
    centroid_valid: [k] bool, False for padding rows (`_padded_k`; zero, and kept so).
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
      updated = _l2_normalize(updated)
    return updated, objective, num_splits + splits

  init = (centroids, jnp.float32(0.0), jnp.int32(0))
  return jax.lax.fori_loop(0, niter, iteration, init)


@jax.jit(static_argnames=('k', 'chunk', 'spherical'))
def _best_of_runs(x, weights, init_centroids, niter, num_runs, key, num_valid, *, k, chunk,
                  spherical):
  """`num_runs` k-means runs; keeps the one with the lowest last-iteration objective.

  Run r initialises with `num_valid` distinct random points drawn from fold_in(key, r + 1) (or
  with `init_centroids`). Jitted once per (N, D, k) shape, `spherical` and whether
  `init_centroids` is given; `niter`, `num_runs`, the key and `num_valid` are traced, so no
  recompiles across seeds, restarts or the cluster counts that share a padded k, and the whole
  search stays on device.

  Args:
    x: [N, D] training points.
    weights: [N] point weights.
    init_centroids: [k, D] or None.
    niter: Lloyd iterations per run.
    num_runs: number of runs.
    key: PRNG key.
    num_valid: the real number of clusters; rows from it to k are padding (`_padded_k`).
    k: number of centroid rows (static).
    chunk: rows per assignment block.
    spherical: spherical k-means.
  Returns:
    [k, D] centroids of the best run, zero from row num_valid on.
  """
  num_points, dim = x.shape
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
      # whose first num_valid are the top num_valid).
      _, first_k = jax.lax.top_k(jax.random.uniform(init_key, (num_points,)), k)
      start = jnp.where(centroid_valid[:, None], x[first_k], 0.0)
    else:
      start = init_centroids
    if spherical:
      start = _l2_normalize(start)
    centroids, objective, _ = _lloyd(padded_x, padded_weights, valid, start, centroid_valid,
                                     niter, split_key, chunk=chunk, spherical=spherical)
    # Strictly better only, as faiss: on a tie the earlier run stays.
    improved = objective < best_objective
    return (jnp.where(improved, centroids, best_centroids),
            jnp.where(improved, objective, best_objective))

  best = (jnp.zeros((k, dim), jnp.float32), jnp.float32(jnp.inf))
  return jax.lax.fori_loop(0, num_runs, one_run, best)[0]


def _kmeans_jax(x, k, *, niter, nredo, seed, spherical, max_points, min_points, weights,
                init_centroids):
  """Pure-JAX k-means (see the module docstring); returns centroids [K, D], K = `_padded_k`,
  whose first k rows are the centroids and the rest zero padding."""
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
  if x.shape[0] == k and init_centroids is None:
    # faiss's corner case: every point is its own centroid, no iteration.
    return _l2_normalize(x) if spherical else x
  padded_k = _padded_k(k, x.shape[0])
  if init_centroids is not None:
    init_centroids = jnp.asarray(init_centroids, jnp.float32)
    init_centroids = jnp.pad(init_centroids, ((0, padded_k - k), (0, 0)))
  # With given initial centroids there is one run: faiss starts every redo after the first from
  # the previous run's result, which is no restart at all.
  num_runs = 1 if init_centroids is not None else nredo
  return _best_of_runs(x, weights, init_centroids, niter, num_runs, base_key, k,
                       k=padded_k, chunk=_chunk_rows(x.shape[0], padded_k),
                       spherical=spherical)


# ----------------------------------------------------------------------------------------------
# faiss k-means.


def _to_host(x):
  """float32 numpy view of x: zero-copy (DLPack) for a CPU JAX array, a copy from a device."""
  if isinstance(x, jax.Array):
    if all(device.platform == 'cpu' for device in x.devices()):
      return np.from_dlpack(x)
    return np.asarray(jax.device_get(x))
  return np.ascontiguousarray(x, dtype=np.float32)


def _faiss_index(faiss, dim, on_gpu, use_float16, device_id):
  """(assignment index, GPU resources or None); the caller keeps both alive together.

  faiss >= 1.15 refuses new attributes on its objects, so the resources cannot be hung on
  the index: they are returned for the caller to hold while the index lives.
  """
  if not on_gpu:
    return faiss.IndexFlatL2(dim), None
  resources = faiss.StandardGpuResources()
  config = faiss.GpuIndexFlatConfig()
  config.useFloat16 = use_float16
  config.device = device_id
  return faiss.GpuIndexFlatL2(resources, dim, config), resources


def _faiss_nearest(index, x, x_host, on_gpu):
  """Nearest centroid in `index` for each sample; on GPU the device features go over DLPack."""
  if on_gpu and isinstance(x, jax.Array):
    try:
      import torch  # pylint: disable=g-import-not-at-top
      import faiss.contrib.torch_utils  # pylint: disable=g-import-not-at-top,unused-import
    except ImportError:
      pass
    else:
      # Without a host copy: faiss's torch bridge searches the GPU tensor in place.
      _, labels = index.search(torch.from_dlpack(x), 1)
      return jax.dlpack.from_dlpack(labels[:, 0].to(torch.int32).contiguous())
  _, labels = index.search(x_host, 1)
  return jnp.asarray(labels[:, 0], jnp.int32)


def _kmeans_faiss(x, k, *, on_gpu, niter, nredo, seed, spherical, max_points, min_points,
                  use_float16, weights, init_centroids):
  """faiss.Clustering k-means; returns (centroids [k, D], im2cluster [N])."""
  faiss = _import_faiss()
  x_host = _to_host(x)
  num_points, dim = x_host.shape
  clus = faiss.Clustering(dim, k)
  clus.verbose = False
  clus.niter = niter
  clus.nredo = nredo
  clus.seed = int(seed) % (2**31)  # A C int.
  clus.spherical = spherical
  clus.max_points_per_centroid = max_points
  clus.min_points_per_centroid = min_points
  if init_centroids is not None:
    # faiss takes initial centroids from clus.centroids; later redos would restart from the
    # previous result, so one run.
    init = np.ascontiguousarray(init_centroids, dtype=np.float32).reshape(-1)
    faiss.copy_array_to_vector(init, clus.centroids)
    clus.nredo = 1
  device_id = 0
  if on_gpu and isinstance(x, jax.Array):
    device_id = next(iter(x.devices())).id
  index, gpu_resources = _faiss_index(faiss, dim, on_gpu, use_float16, device_id)
  host_weights = None if weights is None else np.asarray(weights, dtype=np.float32)
  clus.train(x_host, index, weights=host_weights)

  centroids = faiss.vector_to_array(clus.centroids).reshape(k, dim)
  if spherical:
    # Already unit norm, except in faiss's N == k corner case, which copies the points raw.
    centroids = centroids / np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-30)
  # Search the returned centroids (not whatever the index last held), so im2cluster is their
  # argmin by construction.
  index.reset()
  index.add(np.ascontiguousarray(centroids))
  im2cluster = _faiss_nearest(index, x, x_host, on_gpu)
  del index, gpu_resources  # The index first: it uses the resources.
  return jnp.asarray(centroids), im2cluster


# ----------------------------------------------------------------------------------------------
# Public k-means.


def kmeans(x, k, *, backend='auto', niter=20, nredo=5, seed=0, spherical=True,
           max_points_per_centroid=None, min_points_per_centroid=None, use_float16=True,
           weights=None, init_centroids=None):
  """k-means of the rows of x; host-side driver (the jax backend's inner loop is jitted).

  Args:
    x: [N, D] features (JAX or numpy array; cast to float32).
    k: number of clusters, 1 <= k <= N.
    backend: 'auto', 'faiss' or 'jax' (see `resolve_backend`).
    niter: Lloyd iterations per run.
    nredo: runs from different random initialisations; the lowest objective wins.
    seed: random seed (subsampling, initialisation, empty-cluster splits).
    spherical: renormalise centroids to unit L2 norm after every update.
    max_points_per_centroid: train on a random subset of k * this points when N is larger;
      default int(N * 5 / 3 / k) (the notes' rule), applied identically by both backends.
    min_points_per_centroid: only warns when N < k * this; default int(N / 3 / k).
    use_float16: float16 storage in faiss's GPU index (faiss-gpu only).
    weights: optional [N] non-negative point weights for the centroid means (the hierarchical
      mode weights centroids by their member counts).
    init_centroids: optional [k, D] starting centroids; then a single run (nredo is ignored).
  Returns:
    (centroids [k, D] float32, unit norm when spherical; im2cluster [N] int32, each sample's
    nearest returned centroid; sq_dist [N] float32, squared L2 distance to that centroid),
    all JAX arrays.
  Raises:
    ValueError: k out of range, unknown backend, NaN/inf in x, niter < 0 or nredo < 1, or
      malformed weights/init.
  """
  resolved = resolve_backend(backend)
  x = jnp.asarray(x, jnp.float32)
  if x.ndim != 2:
    raise ValueError(f'k-means features must be [N, D], got shape {x.shape}')
  num_points, dim = x.shape
  _check_k(k, num_points)
  if niter < 0 or nredo < 1:
    raise ValueError(f'clustering.niter={niter} / clustering.nredo={nredo}: need niter >= 0 and '
                     'nredo >= 1')
  _check_finite(x)
  if weights is not None:
    weights = jnp.asarray(weights, jnp.float32)
    if weights.shape != (num_points,) or not bool(jnp.all(jnp.isfinite(weights) & (weights >= 0))):
      raise ValueError(f'k-means weights must be [N]={num_points} finite non-negative values')
  if init_centroids is not None and np.shape(init_centroids) != (k, dim):
    raise ValueError(f'init_centroids must have shape {(k, dim)}, got {np.shape(init_centroids)}')
  if max_points_per_centroid is None:
    max_points_per_centroid = _points_per_centroid(num_points, k, fractions.Fraction(5, 3))
  if min_points_per_centroid is None:
    min_points_per_centroid = _points_per_centroid(num_points, k, fractions.Fraction(1, 3))
  # A zero cap would subsample to nothing; faiss would then fail with an opaque message.
  max_points_per_centroid = max(int(max_points_per_centroid), 1)
  options = dict(niter=niter, nredo=nredo, seed=seed, spherical=spherical,
                 max_points=max_points_per_centroid, min_points=int(min_points_per_centroid),
                 weights=weights, init_centroids=init_centroids)

  if resolved == 'jax':
    centroids = _kmeans_jax(x, k, **options)
    im2cluster, sq_dist = assign_to_centroids(x, centroids, num_valid=k)
    return (centroids if centroids.shape[0] == k else centroids[:k]), im2cluster, sq_dist
  centroids, im2cluster = _kmeans_faiss(x, k, on_gpu=resolved == 'faiss-gpu',
                                        use_float16=use_float16, **options)
  return centroids, im2cluster, sq_dist_to_assigned(x, centroids, im2cluster)


# ----------------------------------------------------------------------------------------------
# Concentration.


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
  """`concentration` computed over `num_segments` >= k clusters (`_padded_k`), k traced, so
  the cluster counts sharing a padded k share one compilation; returns [num_segments], the
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
# Levels (flat or hierarchical).


def _check_hierarchy(num_clusters):
  for fine, coarse in zip(num_clusters, num_clusters[1:]):
    if coarse >= fine:
      raise ValueError(f'clustering.hierarchical=True needs strictly decreasing cluster counts, '
                       f'got {list(num_clusters)}; order schedule.all_clusters fine to coarse or '
                       'set clustering.hierarchical=False')
    if fine / coarse < _MIN_HIERARCHY_RATIO:
      message = (f'hierarchical levels k={fine} -> k={coarse} differ by a ratio of '
                 f'{fine / coarse:.2f} < {_MIN_HIERARCHY_RATIO}; the notes found that ratio '
                 'harmful (coarse levels clustered from too few centroids)')
      warnings.warn(message, stacklevel=3)


def _level_concentration(sq_dist, im2cluster, k: int, temperature):
  """`concentration`, over `_padded_k` clusters where that pads (module docstring)."""
  padded_k = _padded_k(k, sq_dist.shape[0])
  if padded_k == k:
    return concentration(sq_dist, im2cluster, k, temperature)
  return _padded_concentration(sq_dist, im2cluster, k, temperature, num_segments=padded_k)[:k]


def cluster_levels(features, num_clusters, *, backend, niter, nredo, seed, spherical,
                   hierarchical, temperature, use_float16, max_points_factor=5 / 3,
                   min_points_factor=1 / 3):
  """Runs the E-step clustering for every active level; host-side driver.

  Flat mode: each level clusters the samples independently, with seed `seed + level`.
  Hierarchical mode (strictly decreasing k): level 0 clusters the samples; level l+1 clusters
  level l's non-empty centroids weighted by their member counts, and every level-l centroid
  (empty ones included) gets its nearest level-(l+1) centroid as parent; then
  im2cluster_{l+1} = parent[im2cluster_l], so a sample's coarse cluster is always the parent
  of its fine one, and its distance (for the concentration) is to that coarse centroid.
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
    hierarchical: cluster each level's centroids instead of the samples.
    temperature: ProtoNCE temperature (scales the concentrations).
    use_float16: faiss-gpu index storage.
    max_points_factor: max_points_per_centroid = int(n * factor / k), n = points clustered.
    min_points_factor: min_points_per_centroid = int(n * factor / k).
  Returns:
    One dict per level, in order: {'k', 'centroids' [k, D], 'im2cluster' [N] int32,
    'concentration' [k], 'timing_s'}.
  Raises:
    ValueError: bad cluster counts (see `kmeans`), non-decreasing counts in hierarchical mode,
      or a level with more clusters than its parent level has non-empty centroids.
  """
  features = jnp.asarray(features, jnp.float32)
  num_clusters = [int(k) for k in num_clusters]
  num_samples = features.shape[0]
  for k in num_clusters:
    _check_k(k, num_samples)
  if hierarchical:
    _check_hierarchy(num_clusters)

  def run_kmeans(points, k, level, weights=None):
    return kmeans(points, k, backend=backend, niter=niter, nredo=nredo, seed=seed + level,
                  spherical=spherical, use_float16=use_float16, weights=weights,
                  max_points_per_centroid=_points_per_centroid(points.shape[0], k,
                                                               max_points_factor),
                  min_points_per_centroid=_points_per_centroid(points.shape[0], k,
                                                               min_points_factor))

  levels = []
  finer = None  # (centroids, im2cluster) of the previous level in hierarchical mode.
  for level, k in enumerate(num_clusters):
    start = time.perf_counter()
    if finer is None:
      centroids, im2cluster, sq_dist = run_kmeans(features, k, level)
    else:
      fine_centroids, fine_im2cluster = finer
      member_count = jnp.bincount(fine_im2cluster, length=fine_centroids.shape[0])
      populated = np.flatnonzero(np.asarray(member_count) > 0)
      if k > populated.size:
        raise ValueError(
            f'hierarchical level k={k} exceeds the {populated.size} non-empty centroids of the '
            f'level above (k={fine_centroids.shape[0]}); use fewer clusters at this level or set '
            'clustering.hierarchical=False')
      centroids, _, _ = run_kmeans(fine_centroids[populated], k, level,
                                   weights=member_count[populated])
      parent, _ = assign_to_centroids(fine_centroids, centroids)
      im2cluster = parent[fine_im2cluster]
      sq_dist = sq_dist_to_assigned(features, centroids, im2cluster)
    phi = _level_concentration(sq_dist, im2cluster, k, temperature)
    if hierarchical:
      finer = (centroids, im2cluster)
    normalized = _l2_normalize(centroids)
    jax.block_until_ready((normalized, phi))
    levels.append({'k': k, 'centroids': normalized, 'im2cluster': im2cluster.astype(jnp.int32),
                   'concentration': phi, 'timing_s': time.perf_counter() - start})
  return levels
