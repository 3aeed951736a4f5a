"""2-D convolution on PyTorch's CPU kernels (oneDNN), callable and differentiable from jitted JAX.

Why this exists: on CPU, XLA's convolutions (above all the weight gradient, 2.5-4x its forward)
left the jitted PCL step at ~0.6x of an eager PyTorch step on the same cores
(benchmarks/step_throughput.py). PyTorch ships oneDNN's convolutions, and torch is already a
dependency for data loading. `conv_general_dilated` here has `lax.conv_general_dilated`'s
signature, so `flax.linen.Conv(conv_general_dilated=...)` takes it unchanged: the forward and the
backward (d images and d kernel in one call; d kernel alone for a layer whose input is data) run
as `jax.experimental.buffer_callback`s on zero-copy torch views of XLA's own buffers -- NHWC is
exactly PyTorch's channels-last layout -- and a `jax.custom_vjp` wires the gradients. Batch
norm, losses, the optimizer and the momentum update stay in XLA.

Kernels are HWIO (flax's layout, what `nn.Conv` passes) or OHWI (the byte layout of a
channels-last PyTorch weight), each seen by torch as an OIHW view without a copy. oneDNN
reorders either into its own blocked format on every call; from OHWI its calls ran ~4-6% faster
in isolation, but transposing flax's kernels to OHWI in the step costs as much as it saves
(benchmarks/RESULTS.md), so HWIO is taken as it is. On CPU `runtime.conv_impl=auto` runs
`onednn.conv` where it builds; this module is its fallback (bfloat16) and the `torch` set.

Only for a single CPU device (`conv_args.single_cpu_device`); `pcl_jax.kernels.select` makes that
choice for `runtime.conv_impl='auto'`. Cases the fast path does not cover (dilation, groups,
asymmetric padding, other layouts or dtypes) fall back to XLA's convolution, so the function is
always safe to call.
"""

import functools
import threading
from typing import Sequence, Tuple

import jax
import torch

from pcl_jax.kernels import conv_args

try:  # experimental API (jax >= 0.6); without it runtime.conv_impl=auto means xla
  from jax.experimental import buffer_callback as _buffer_callback
except ImportError:  # pragma: no cover - depends on the installed jax
  _buffer_callback = None

# XLA's CPU runtime runs independent ops concurrently (e.g. the query and key encoders). Two
# torch convolutions at once would each start an all-core OpenMP team on the same cores; one at
# a time, while XLA's own ops still overlap them, is faster.
_TORCH_LOCK = threading.Lock()


def available() -> Tuple[bool, str]:
  """(whether runtime.conv_impl=torch can run here, why not)."""
  if _buffer_callback is None:
    return False, f'jax {jax.__version__} has no jax.experimental.buffer_callback'
  return conv_args.single_cpu_device()


# --- host side: torch views of XLA buffers and the three computations ------------------------

def _images(buffer) -> torch.Tensor:
  """An NHWC buffer as an NCHW tensor in channels-last memory (same bytes, no copy)."""
  return torch.from_dlpack(buffer).permute(0, 3, 1, 2)


def _kernel(buffer, layout: str) -> torch.Tensor:
  """An HWIO or OHWI buffer as an OIHW view (no copy; OHWI is channels-last memory)."""
  return torch.from_dlpack(buffer).permute(*(layout.index(axis) for axis in 'OIHW'))


def _forward_host(unused_ctx, out, images, kernel, *, stride, padding, layout):
  with _TORCH_LOCK, torch.no_grad():
    result = torch.nn.functional.conv2d(_images(images), _kernel(kernel, layout), stride=stride,
                                        padding=padding)
    _images(out).copy_(result)


def _backward_host(unused_ctx, out, out_grad, images, kernel, *, stride, padding, layout,
                   images_too):
  """(d images, d kernel) into `out` = (buffer, buffer), or d kernel alone into `out` = buffer for
  a layer whose input is data (a network's first), where d images would be unused.

  Both in one call: XLA's next op (the previous layer's BN backward) needs d images, so it cannot
  start, and compete for the cores, while d kernel is still running."""
  with _TORCH_LOCK, torch.no_grad():
    grads = torch.ops.aten.convolution_backward(
        _images(out_grad), _images(images), _kernel(kernel, layout), None, list(stride),
        list(padding), [1, 1], False, [0, 0], 1, [images_too, True, False])
    if images_too:
      _images(out[0]).copy_(grads[0])
      _kernel(out[1], layout).copy_(grads[1])
    else:
      _kernel(out, layout).copy_(grads[1])


def _host_call(host, like: jax.ShapeDtypeStruct, *operands):
  """Runs `host(ctx, out, *operands)` writing XLA's output buffer in place: no copy back, which
  a pure_callback returning a new array would cost (~3 ms per 16 MB activation here)."""
  return _buffer_callback.buffer_callback(host, like)(*operands)


# --- device side: the differentiable op ----------------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _torch_conv(images, kernel, stride: Tuple[int, int], padding: Tuple[int, int], layout: str):
  shape = conv_args.output_shape(images.shape, kernel.shape, stride, padding, layout)
  host = functools.partial(_forward_host, stride=stride, padding=padding, layout=layout)
  return _host_call(host, jax.ShapeDtypeStruct(shape, images.dtype), images, kernel)


def _torch_conv_forward(images, kernel, stride, padding, layout):
  # symbolic_zeros: `perturbed` says whether a gradient flows into the images at all (it does
  # not for a network's first layer, whose input is data).
  out = _torch_conv(images.value, kernel.value, stride, padding, layout)
  return out, (images.value, kernel.value, images.perturbed)


def _torch_conv_backward(stride, padding, layout, residuals, out_grad):
  images, kernel, images_need_grad = residuals
  out_grad = out_grad.astype(images.dtype)
  like = lambda array: jax.ShapeDtypeStruct(array.shape, array.dtype)
  host = functools.partial(_backward_host, stride=stride, padding=padding, layout=layout,
                           images_too=images_need_grad)
  if images_need_grad:
    return tuple(_host_call(host, (like(images), like(kernel)), out_grad, images, kernel))
  return None, _host_call(host, like(kernel), out_grad, images, kernel)


_torch_conv.defvjp(_torch_conv_forward, _torch_conv_backward, symbolic_zeros=True)


def conv_general_dilated(lhs, rhs, window_strides: Sequence[int], padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count: int = 1,
                         precision=None, preferred_element_type=None):
  """`lax.conv_general_dilated` that runs plain 2-D NHWC convolutions on PyTorch's CPU kernels."""
  plain = conv_args.plain_conv(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                               dimension_numbers, feature_group_count, preferred_element_type)
  if plain is None:
    return jax.lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
        precision=precision, preferred_element_type=preferred_element_type)
  return _torch_conv(lhs, rhs, *plain)
