"""Max-pooling: overlapping windows (ResNet's 3x3 stride-2 stem pool) with a fast gradient, and
the 2x2 pool after a ReLU that ends each Conv4 block (`relu_max_pool_2x2`).

Why this exists: `nn.max_pool`'s gradient is XLA's select-and-scatter, which is slow on CPU: the
ResNet stem pool at 84 px, batch 96 (96x42x42x64) took 106 ms forward + backward against
PyTorch's 14 ms, about half of the ResNet-18 step's gap to PyTorch. Here the forward takes the
max over the k*k strided slices of the padded input and records which slice won; the backward
routes each output's gradient back through that record using only pads, shifts and reshapes,
which XLA fuses into a few elementwise loops.

The winner of a tie is the window's first maximal element in row-major order, and NaN wins, as
in PyTorch's CPU max_pool2d (jnp.max-based gradients would split a tie; ties are common after a
ReLU). Floor mode and -inf padding, as `torch.nn.functional.max_pool2d(ceil_mode=False)`.

`relu_max_pool_2x2` is an activation for `GroupedBatchNorm`: a kernel set's `batch_norm` that
knows it runs BN + ReLU + pool as one op (`fused_batch_norm.batch_norm_relu_max_pool`); called
as it is (evaluation), it is a ReLU and a reshape + max.
"""

import functools

import jax
import jax.numpy as jnp


def output_size(size: int, window: int, stride: int, padding: int) -> int:
  """Pooled length of `size` (floor mode, as PyTorch)."""
  return (size + 2 * padding - window) // stride + 1


def _window_slices(x, window: int, stride: int, padding: int):
  """The window*window strided views of the -inf-padded NHWC `x`, one per offset (dy, dx) in
  row-major order: slice [dy*window+dx][b, oy, ox, c] = padded[b, stride*oy+dy, stride*ox+dx, c]."""
  _, height, width, _ = x.shape
  out_h = output_size(height, window, stride, padding)
  out_w = output_size(width, window, stride, padding)
  padded = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)),
                   constant_values=-jnp.inf)
  rows, columns = stride * (out_h - 1) + 1, stride * (out_w - 1) + 1
  return [padded[:, dy:dy + rows:stride, dx:dx + columns:stride]
          for dy in range(window) for dx in range(window)]


def _max_and_winner(x, window: int, stride: int, padding: int):
  """(pooled, winner): winner [B,OH,OW,C] int8 is the row-major offset of the first max."""
  slices = _window_slices(x, window, stride, padding)
  best, winner = slices[0], jnp.zeros(slices[0].shape, jnp.int8)
  for offset, candidate in enumerate(slices[1:], start=1):
    takes = (candidate > best) | jnp.isnan(candidate)
    best = jnp.where(takes, candidate, best)
    winner = jnp.where(takes, jnp.int8(offset), winner)
  return best, winner


def _shift(plane, shift: int, axis: int, length: int):
  """`plane` moved `shift` places along `axis` (zeros enter) and cut or zero-filled to `length`."""
  pads = [(0, 0)] * plane.ndim
  pads[axis] = (shift, length - shift - plane.shape[axis])
  return jax.lax.pad(plane, jnp.zeros((), plane.dtype), [(lo, hi, 0) for lo, hi in pads])


def _interleave(planes, axis: int):
  """planes[r][..., q, ...] -> out[..., stride*q + r, ...] along `axis` (stride = len(planes))."""
  stacked = jnp.stack(planes, axis=axis + 1)
  shape = list(planes[0].shape)
  shape[axis] *= len(planes)
  return stacked.reshape(shape)


def _route_gradient(out_grad, winner, input_shape, window: int, stride: int, padding: int):
  """d input: each output's gradient added at its winner's input position.

  An output (oy, ox) with winner (dy, dx) feeds padded position (stride*oy+dy, stride*ox+dx).
  Grouping padded rows by residue r = row % stride, offset dy = r + stride*j lands on plane row
  oy + j; so each residue plane is a sum of shifted masked gradients, and interleaving the
  planes gives the padded gradient, cropped to the input."""
  _, height, width, _ = input_shape
  _, out_h, out_w, _ = out_grad.shape
  extra = -(-window // stride)  # plane rows beyond the outputs' that a shift can reach
  rows = []
  for ry in range(stride):
    columns = []
    for rx in range(stride):
      plane = jnp.zeros(out_grad.shape[:1] + (out_h + extra, out_w + extra) + out_grad.shape[3:],
                        out_grad.dtype)
      for dy in range(ry, window, stride):
        for dx in range(rx, window, stride):
          masked = jnp.where(winner == dy * window + dx, out_grad, jnp.zeros((), out_grad.dtype))
          masked = _shift(masked, dy // stride, 1, out_h + extra)
          plane = plane + _shift(masked, dx // stride, 2, out_w + extra)
      columns.append(plane)
    rows.append(_interleave(columns, 2))
  padded = _interleave(rows, 1)
  return padded[:, padding:padding + height, padding:padding + width]


def max_pool(x, window: int, stride: int, padding: int):
  """NHWC max-pool, square `window` / `stride` / symmetric `padding` (torch's max_pool2d)."""
  if not (1 <= window <= 11 and stride >= 1 and 0 <= 2 * padding <= window):
    raise ValueError(f'max_pool(window={window}, stride={stride}, padding={padding}) needs '
                     '1 <= window <= 11 (the winner is stored as int8), stride >= 1 and '
                     '0 <= padding <= window / 2 (as PyTorch)')
  return _max_pool(x, window, stride, padding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool(x, window: int, stride: int, padding: int):
  return _max_and_winner(x, window, stride, padding)[0]


def _forward(x, window, stride, padding):
  pooled, winner = _max_and_winner(x, window, stride, padding)
  return pooled, (winner, x.shape)


def _backward(window, stride, padding, residuals, out_grad):
  winner, input_shape = residuals
  return (_route_gradient(out_grad, winner, input_shape, window, stride, padding),)


_max_pool.defvjp(_forward, _backward)


def max_pool_2x2(x):
  """2x2 stride-2 max-pool (floor mode, as PyTorch) as a reshape + max.

  Same values as nn.max_pool(x, (2, 2), (2, 2)), but its gradient is an elementwise mask instead
  of XLA's select-and-scatter, which is several times slower on CPU.
  """
  batch, height, width, channels = x.shape
  x = x[:, :height // 2 * 2, :width // 2 * 2]
  x = x.reshape(batch, height // 2, 2, width // 2, 2, channels)
  return x.max(axis=(2, 4))


def relu_max_pool_2x2(x):
  """max_pool_2x2(relu(x)): the activation that ends a Conv4 block."""
  return max_pool_2x2(jax.nn.relu(x))
