"""Max-pooling as XLA FFI custom calls on oneDNN (ResNet's stem pool under
`runtime.conv_impl=onednn`), CPU only.

Why this exists: `max_pool`'s pure-JAX pool (k*k strided slices, a winner record, and a gradient
routed through pads and shifts) is far faster than XLA's select-and-scatter, but on one XLA
thread it still cost ~44 ms of the ~570 ms mini-ImageNet step (84 px, batch 96) on the 2-core
test machine (a step profile). oneDNN's pooling records each window's winner in its
workspace and routes the gradient through it, on every core.

Semantics are `max_pool.max_pool`'s (PyTorch's max_pool2d): floor mode, padding that never
wins, the first maximal element of a window in row-major order takes a tie's gradient. One
difference: a NaN in a window does not win here (oneDNN compares with >), where PyTorch's CPU
kernel and `max_pool` propagate it; a NaN activation has already spoiled the step either way.
float32 NHWC only; `pooled` falls back to `max_pool.max_pool` for anything else.
"""

import ctypes
import functools

import jax
import jax.numpy as jnp
import numpy as np

from pcl_jax.kernels import max_pool as max_pool_lib
from pcl_jax.kernels.onednn import library


@functools.lru_cache(maxsize=None)
def _workspace_bytes(shape, window: int, stride: int, padding: int) -> int:
  return library.query_bytes(
      'pcl_max_pool_workspace_bytes', [ctypes.c_int64] * 7, *shape, window, stride, padding,
      what=f'max-pool {window}x{window}/{stride} pad {padding} for {list(shape)}')


def supported(x, window: int, stride: int, padding: int) -> bool:
  """Whether the custom calls take this pooling: float32 NHWC, and floor mode leaving no
  negative bottom/right padding (a window never starts past the input)."""
  if x.dtype != jnp.float32 or x.ndim != 4:
    return False
  return all((max_pool_lib.output_size(size, window, stride, padding) - 1) * stride
             + window - size - padding >= 0 for size in x.shape[1:3])


def _attributes(window, stride, padding):
  return dict(window=np.int64(window), stride=np.int64(stride), pad=np.int64(padding))


def _forward_call(x, window, stride, padding):
  out_shape = (x.shape[0],) + tuple(max_pool_lib.output_size(size, window, stride, padding)
                                    for size in x.shape[1:3]) + (x.shape[3],)
  workspace = _workspace_bytes(tuple(x.shape), window, stride, padding)
  return library.call('max_pool_forward',
                          (jax.ShapeDtypeStruct(out_shape, jnp.float32),
                           jax.ShapeDtypeStruct((workspace,), jnp.uint8)),
                          x, **_attributes(window, stride, padding))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def max_pool(x: jax.Array, window: int, stride: int, padding: int) -> jax.Array:
  """NHWC float32 max-pool (square `window` / `stride`, symmetric `padding`), as
  `max_pool.max_pool`; callers check `supported` first."""
  return _forward_call(x, window, stride, padding)[0]


def _forward(x, window, stride, padding):
  out, workspace = _forward_call(x, window, stride, padding)
  return out, (workspace, x.shape)


def _backward(window, stride, padding, residuals, out_grad):
  workspace, input_shape = residuals
  return (library.call('max_pool_backward', jax.ShapeDtypeStruct(input_shape, jnp.float32),
                           out_grad.astype(jnp.float32), workspace,
                           **_attributes(window, stride, padding)),)


max_pool.defvjp(_forward, _backward)


def pooled(x: jax.Array, window: int, stride: int, padding: int) -> jax.Array:
  """The kernel set's max-pool: on oneDNN where `supported`, else `max_pool.max_pool`."""
  if supported(x, window, stride, padding):
    return max_pool(x, window, stride, padding)
  return max_pool_lib.max_pool(x, window, stride, padding)
