"""k-means of features with a choice of backend: the public `kmeans` and `resolve_backend`.

This module owns the `clustering.backend` setting (`auto`, `faiss`, `jax`; DESIGN.md section 2
"Clustering backends") and the checks and defaults every backend shares (k in range, finite
features, the notes' points-per-centroid rule), then hands over to `faiss_kmeans` or
`jax_kmeans`. Results are device arrays.
"""

import fractions

import jax
import jax.numpy as jnp
import numpy as np

from pcl_jax.clustering import faiss_kmeans
from pcl_jax.clustering import jax_kmeans
from pcl_jax import configuration


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
  if name not in configuration.BACKENDS:
    raise ValueError(f"clustering.backend='{name}' is unknown; use auto, faiss or jax")
  if name == 'jax':
    return 'jax'
  faiss = faiss_kmeans.import_faiss()
  on_gpu = jax.default_backend() == 'gpu'
  if name == 'auto':
    if faiss is None:
      return 'jax'
    if on_gpu:
      return 'faiss-gpu' if faiss_kmeans.sees_gpu(faiss) else 'jax'
    return 'faiss-cpu' if jax.default_backend() == 'cpu' else 'jax'
  if faiss is None:
    raise ValueError(f"clustering.backend='{name}' but faiss is not installed; install faiss-cpu "
                     '(or faiss-gpu) or set clustering.backend=jax')
  gpu_ok = on_gpu and faiss_kmeans.sees_gpu(faiss)
  if name == 'faiss-gpu' and not gpu_ok:
    raise ValueError("clustering.backend='faiss-gpu' needs JAX on a GPU and a faiss build that "
                     'sees it; use clustering.backend=faiss or auto')
  if name == 'faiss':
    return 'faiss-gpu' if gpu_ok else 'faiss-cpu'
  return name


def points_per_centroid(num_points: int, k: int, factor: float) -> int:
  """int(num_points * factor / k), exact for rational factors such as 5/3 and 1/3.

  The float product N * (1/3) can land just below an integer and floor one too low; the
  researcher's int(N * 5 / 3 / k) cannot, so the factor is taken as a fraction.
  """
  ratio = fractions.Fraction(factor).limit_denominator(1000)
  return int(num_points * ratio.numerator // (ratio.denominator * k))


def check_k(k: int, num_points: int):
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


def kmeans(x, k, *, backend='auto', niter=20, nredo=5, seed=0, spherical=True,
           max_points_per_centroid=None, min_points_per_centroid=None, use_float16=True,
           weights=None, init_centroids=None, padding=None):
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
    padding: optional `jax_kmeans.Padding`, the shapes the jax backend computes with, so that
      every k of a run shares one program (`clustering.pad_k`); the results are exact k's to
      float rounding. Ignored by faiss.
  Returns:
    (centroids [k, D] float32, unit norm when spherical; im2cluster [N] int32, each sample's
    nearest returned centroid; sq_dist [N] float32, squared L2 distance to that centroid),
    all JAX arrays.
  Raises:
    ValueError: k out of range, unknown backend, NaN/inf in x, niter < 0 or nredo < 1, or
      malformed weights/init.
  """
  resolved = resolve_backend(backend)
  if resolved != 'jax':
    x = faiss_kmeans.on_one_device(x)
  x = jnp.asarray(x, jnp.float32)
  if x.ndim != 2:
    raise ValueError(f'k-means features must be [N, D], got shape {x.shape}')
  num_points, dim = x.shape
  check_k(k, num_points)
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
    max_points_per_centroid = points_per_centroid(num_points, k, fractions.Fraction(5, 3))
  if min_points_per_centroid is None:
    min_points_per_centroid = points_per_centroid(num_points, k, fractions.Fraction(1, 3))
  # A zero cap would subsample to nothing; faiss would then fail with an opaque message.
  max_points_per_centroid = max(int(max_points_per_centroid), 1)
  options = dict(niter=niter, nredo=nredo, seed=seed, spherical=spherical,
                 max_points=max_points_per_centroid, min_points=int(min_points_per_centroid),
                 weights=weights, init_centroids=init_centroids)

  if resolved == 'jax':
    centroids = jax_kmeans.kmeans(x, k, padding=padding, **options)
    im2cluster, sq_dist = jax_kmeans.assign_to_centroids(x, centroids, num_valid=k)
    return (centroids if centroids.shape[0] == k else centroids[:k]), im2cluster, sq_dist
  centroids, im2cluster = faiss_kmeans.kmeans(x, k, on_gpu=resolved == 'faiss-gpu',
                                              use_float16=use_float16, **options)
  return centroids, im2cluster, jax_kmeans.sq_dist_to_assigned(x, centroids, im2cluster)
