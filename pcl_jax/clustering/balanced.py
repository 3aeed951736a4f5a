"""Balanced cluster assignments: Sinkhorn-Knopp equipartition over k-means' centroids.

This module owns the E-step's `clustering.levels='balanced'`. k-means leaves clusters of very
different sizes (on small image sets at k=100, singletons next to clusters of 60), and ProtoNCE
then pulls most samples towards a few crowded prototypes. SeLa (Asano et al. 2020) and SwAV
(Caron et al. 2020) instead assign samples under the constraint that every cluster gets an equal
share: the assignment Q maximising tr(Q^T S) + epsilon * H(Q) over the transport polytope with
uniform marginals (each sample 1/N, each cluster 1/k), S the cosine similarities of samples to
centroids. Sinkhorn-Knopp finds Q by alternately rescaling its rows and its columns; each sample
then takes the cluster with the largest entry of its row. Then each centroid is recomputed as
the mean of its new members, so a prototype is the centre of the samples it is the positive of.

The iteration runs in the log domain (exp(S / epsilon) overflows float32 below epsilon ~ 0.01)
and over blocks of rows, so memory is one [block, k] matrix, never [N, k]: at mini-ImageNet
scale (N = 60000, k = 3200) the whole matrix would be 0.8 GB per level. A row rescaling does not
change which entry of a row is largest, so only the column potentials are kept.
"""

import functools

import jax
import jax.numpy as jnp

from pcl_jax.clustering import jax_kmeans
from pcl_jax import models

# Elements of one [block, k] similarity matrix.
_BLOCK_ELEMENTS = 1 << 22


def _block_rows(num_points: int, k: int) -> int:
  rows = max(8, _BLOCK_ELEMENTS // k)
  return min(rows, -(-num_points // 8) * 8)


def _row_blocks(features, block_rows: int):
  """Features zero-padded to whole blocks, [num_blocks, block_rows, D], and which rows are real."""
  num_points, dim = features.shape
  pad = (-num_points) % block_rows
  padded = jnp.pad(features, ((0, pad), (0, 0)))
  real = jnp.arange(num_points + pad) < num_points
  return padded.reshape(-1, block_rows, dim), real.reshape(-1, block_rows)


@functools.partial(jax.jit, static_argnames=('iterations', 'block_rows'))
def _column_potentials(features, unit_centroids, epsilon, *, iterations, block_rows):
  """Log column scalings b [k] of the Sinkhorn-Knopp plan, after `iterations` row-then-column
  rescalings from b = 0; the plan is Q_ij = exp(S_ij / epsilon + a_i + b_j)."""
  num_points = features.shape[0]
  k = unit_centroids.shape[0]
  blocks, real = _row_blocks(features, block_rows)
  log_row_mass = -jnp.log(jnp.float32(num_points))
  log_column_mass = -jnp.log(jnp.float32(k))

  def iteration(column_potential, _):
    def add_block(column_logsum, block):
      rows, row_is_real = block
      logits = rows @ unit_centroids.T / epsilon
      # Each real row of the plan sums to 1/N under the current column scaling.
      row_potential = log_row_mass - jax.nn.logsumexp(logits + column_potential, axis=1)
      row_potential = jnp.where(row_is_real, row_potential, -jnp.inf)
      return jnp.logaddexp(column_logsum, jax.nn.logsumexp(
          logits + row_potential[:, None], axis=0)), None

    column_logsum, _ = jax.lax.scan(add_block, jnp.full((k,), -jnp.inf), (blocks, real))
    # ... then each column sums to 1/k.
    return log_column_mass - column_logsum, None

  column_potential, _ = jax.lax.scan(iteration, jnp.zeros((k,), jnp.float32), None,
                                     length=iterations)
  return column_potential


@functools.partial(jax.jit, static_argnames=('block_rows',))
def _argmax_assignments(features, unit_centroids, column_potential, epsilon, *, block_rows):
  blocks, _ = _row_blocks(features, block_rows)
  best = jax.lax.map(
      lambda rows: jnp.argmax(rows @ unit_centroids.T / epsilon + column_potential, axis=1),
      blocks)
  return best.reshape(-1)[:features.shape[0]].astype(jnp.int32)


def sinkhorn_assignments(features, centroids, *, epsilon: float, iterations: int):
  """Each sample's cluster under the Sinkhorn-Knopp equipartition (module docstring).

  Args:
    features: [N, D] L2-normalised samples.
    centroids: [k, D] centroids (normalised here; the similarity is the cosine).
    epsilon: entropy weight; smaller is closer to the hard, exactly balanced assignment.
    iterations: Sinkhorn-Knopp row-and-column rescalings.
  Returns:
    [N] int32 cluster of each sample.
  """
  features = jnp.asarray(features, jnp.float32)
  unit_centroids = models.l2_normalize(jnp.asarray(centroids, jnp.float32))
  block_rows = _block_rows(features.shape[0], unit_centroids.shape[0])
  epsilon = jnp.float32(epsilon)
  column_potential = _column_potentials(features, unit_centroids, epsilon,
                                        iterations=int(iterations), block_rows=block_rows)
  return _argmax_assignments(features, unit_centroids, column_potential, epsilon,
                             block_rows=block_rows)


@functools.partial(jax.jit, static_argnames=('spherical',))
def _member_means(features, centroids, im2cluster, *, spherical):
  """Each cluster's mean of its members (unit norm when spherical); an empty cluster keeps its
  centroid."""
  k = centroids.shape[0]
  size = jax.ops.segment_sum(jnp.ones(features.shape[0], jnp.float32), im2cluster,
                             num_segments=k)
  total = jax.ops.segment_sum(features, im2cluster, num_segments=k)
  means = jnp.where(size[:, None] > 0, total / jnp.maximum(size, 1.0)[:, None], centroids)
  return models.l2_normalize(means) if spherical else means


def rebalance(features, centroids, *, epsilon: float, iterations: int, spherical: bool):
  """k-means' clusters made balanced: Sinkhorn-Knopp assignments, then member-mean centroids.

  Args:
    features: [N, D] L2-normalised samples.
    centroids: [k, D] k-means centroids.
    epsilon, iterations: see `sinkhorn_assignments`.
    spherical: unit-norm centroids, as the k-means that made them.
  Returns:
    (centroids [k, D], im2cluster [N] int32, sq_dist [N]: squared L2 distance of each sample to
    its new centroid), as `backend.kmeans` returns them.
  """
  features = jnp.asarray(features, jnp.float32)
  centroids = jnp.asarray(centroids, jnp.float32)
  im2cluster = sinkhorn_assignments(features, centroids, epsilon=epsilon, iterations=iterations)
  centroids = _member_means(features, centroids, im2cluster, spherical=spherical)
  return centroids, im2cluster, jax_kmeans.sq_dist_to_assigned(features, centroids, im2cluster)
