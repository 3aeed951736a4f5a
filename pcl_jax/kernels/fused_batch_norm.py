"""Training-mode batch norm + ReLU + 2x2 max-pool as one op with a hand-written gradient.

Why this exists: in Conv4 at 84 px the first block's activations are 115 MB per batch of 64, and
what XLA made of BN -> ReLU -> max-pool and its autodiff (a materialised broadcast, separate
reductions, an equality mask per pooling window) read or wrote that tensor about a dozen times per
step; on 2 CPU cores those passes cost more than the block's convolution. Here the forward reads
the input twice (statistics, then normalise + ReLU + pool in one pass that also records which
window element won) and the backward once (d input from per-channel coefficients, the winner
index and the pooled gradient). Measured on one block: 104 ms -> 36 ms forward + backward,
PyTorch eager 96 ms (benchmarks/step_throughput.py has the whole-step figures).

Semantics are those of `GroupedBatchNorm` (statistics per group of consecutive samples, biased
variance E[x^2] - E[x]^2 in float32) followed by `relu` and a floor-mode 2x2 max-pool, with one
choice made explicit: the pooling gradient goes to the first maximal element of each window in
row-major order, as PyTorch's max_pool2d does (jnp.max would split it between ties; ties are
common where an image is flat). The op is pure JAX, so it runs and shards wherever XLA does.
"""

import functools
from typing import Callable, Optional, Tuple

import jax
import jax.numpy as jnp

from pcl_jax.kernels import max_pool

# Window elements in row-major order; index 4 marks a window whose maximum is <= 0, so the ReLU
# passes no gradient to any of its elements.
_WINDOW = ((0, 0), (0, 1), (1, 0), (1, 1))
_NO_GRADIENT = len(_WINDOW)


def group_statistics(x: jax.Array, num_groups: int) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """(x as float32 [G, B/G, ..., C], mean [G, C], biased variance [G, C]) per sample group."""
  batch = x.shape[0]
  if batch % num_groups:
    raise ValueError(f'batch {batch} is not divisible by {num_groups} BN groups')
  grouped = x.astype(jnp.float32).reshape((num_groups, batch // num_groups) + x.shape[1:])
  axes = tuple(range(1, grouped.ndim - 1))
  mean = grouped.mean(axes)
  # E[x^2] - E[x]^2: one pass over the activations, as flax.linen.BatchNorm does.
  var = jnp.maximum((grouped * grouped).mean(axes) - mean * mean, 0.0)
  return grouped, mean, var


def per_group(values: jax.Array, ndim: int = 5) -> jax.Array:
  """Per-group, per-channel values [G, C] shaped [G, 1, ..., 1, C] (`ndim` axes), to broadcast
  against a grouped tensor such as `group_statistics`' [G, b, H, W, C]."""
  return values.reshape((values.shape[0],) + (1,) * (ndim - 2) + (values.shape[-1],))


def grouped_batch_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, num_groups: int,
                       epsilon: float, activation: Optional[Callable] = None):
  """Training BN, statistics per group of samples, then `activation` (None: none), in XLA's
  ops: (output float32, mean [G, C], biased variance [G, C]). `max_pool.relu_max_pool_2x2` runs
  fused (`batch_norm_relu_max_pool`), `jax.nn.relu` as a max in BN's own pass; any other
  function is applied to the normalised output. `onednn.batch_norm` is the same contract on
  oneDNN."""
  if activation is max_pool.relu_max_pool_2x2:
    return batch_norm_relu_max_pool(x, scale, bias, num_groups, epsilon)
  grouped, mean, var = group_statistics(x, num_groups)
  gain = jax.lax.rsqrt(var + epsilon) * scale
  ndim = grouped.ndim
  out = (grouped * per_group(gain, ndim) + per_group(bias - mean * gain, ndim)).reshape(x.shape)
  if activation is jax.nn.relu:
    out = jnp.maximum(out, 0.0)
  elif activation is not None:
    out = activation(out)
  return out, mean, var


def _windows(grouped: jax.Array):
  """The four strided views [G, b, H/2, W/2, C] of a grouped NHWC tensor, odd edges dropped."""
  height, width = grouped.shape[2] // 2 * 2, grouped.shape[3] // 2 * 2
  return [grouped[:, :, i:height:2, j:width:2] for i, j in _WINDOW]


def _forward(x, scale, bias, num_groups, epsilon):
  grouped, mean, var = group_statistics(x, num_groups)
  inv_std = jax.lax.rsqrt(var + epsilon)
  gain = inv_std * scale
  shift = bias - mean * gain
  windows = _windows(grouped)
  normalised = [window * per_group(gain) + per_group(shift) for window in windows]
  best, winner_input = normalised[0], windows[0]
  winner = jnp.zeros(best.shape, jnp.int8)
  for k in range(1, len(windows)):
    better = normalised[k] > best  # strict: the first maximal element wins ties
    best = jnp.where(better, normalised[k], best)
    winner = jnp.where(better, jnp.int8(k), winner)
    winner_input = jnp.where(better, windows[k], winner_input)
  winner = jnp.where(best > 0, winner, jnp.int8(_NO_GRADIENT))
  batch, _, _, channels = x.shape
  out = jnp.maximum(best, 0.0).reshape((batch,) + best.shape[2:4] + (channels,))
  residuals = (x, winner, winner_input, mean, inv_std, scale)
  return (out.astype(x.dtype), mean, var), residuals


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def batch_norm_relu_max_pool(x: jax.Array, scale: jax.Array, bias: jax.Array, num_groups: int,
                             epsilon: float) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """max_pool_2x2(relu(batch_norm(x))) with batch statistics per group of samples.

  Args:
    x: NHWC activations, any float dtype (statistics are float32).
    scale, bias: BN's affine parameters [C], float32.
    num_groups: statistics are computed per group of B / num_groups consecutive samples.
    epsilon: added to the variance.

  Returns:
    (pooled output [B, H//2, W//2, C] in x's dtype, mean [G, C], biased variance [G, C]); the
    statistics are for the caller's running averages, and differentiable like the output.
  """
  return _forward(x, scale, bias, num_groups, epsilon)[0]


def _backward(num_groups, epsilon, residuals, cotangents):
  del epsilon  # inv_std is saved
  x, winner, winner_input, mean, inv_std, scale = residuals
  out_grad, mean_grad, var_grad = cotangents
  out_grad = jnp.where(winner < _NO_GRADIENT,
                       out_grad.astype(jnp.float32).reshape(winner.shape), 0.0)
  count = x.size // (num_groups * x.shape[-1])
  normalised_winner = (winner_input - per_group(mean)) * per_group(inv_std)
  # d normalised = d z * scale; the two sums BN's backward needs, from the pooled grid alone.
  bias_grad_groups = out_grad.sum((1, 2, 3))
  scale_grad_groups = (out_grad * normalised_winner).sum((1, 2, 3))
  gain = inv_std * scale
  # d x = gain * d z + c0 + c1 * x, per group and channel: BN's backward, plus the statistics'
  # own cotangents (d mean / d x = 1/n, d var / d x = 2 (x - mean) / n).
  c1 = (-gain * inv_std * scale_grad_groups + 2.0 * var_grad) / count
  c0 = (-gain * bias_grad_groups + mean_grad) / count - c1 * mean
  grads_at_windows = [jnp.where(winner == k, out_grad, 0.0) for k in range(len(_WINDOW))]
  # Interleave the four [G, b, H/2, W/2, C] gradients back to [G, b, H', W', C] ...
  pooled_shape = out_grad.shape
  rows = [jnp.stack(grads_at_windows[2 * i:2 * i + 2], axis=4) for i in range(2)]
  input_grad = jnp.stack(rows, axis=3).reshape(
      pooled_shape[:2] + (2 * pooled_shape[2], 2 * pooled_shape[3], pooled_shape[4]))
  # ... and zero-pad the odd row / column that floor-mode pooling dropped.
  height, width = x.shape[1:3]
  input_grad = jnp.pad(input_grad, ((0, 0), (0, 0), (0, height % 2), (0, width % 2), (0, 0)))
  grouped = x.astype(jnp.float32).reshape(input_grad.shape)
  dx = input_grad * per_group(gain) + per_group(c0) + per_group(c1) * grouped
  return dx.reshape(x.shape).astype(x.dtype), scale_grad_groups.sum(0), bias_grad_groups.sum(0)


batch_norm_relu_max_pool.defvjp(_forward, _backward)
