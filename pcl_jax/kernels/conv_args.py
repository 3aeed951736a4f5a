"""Which `lax.conv_general_dilated` calls the CPU kernels take, and their output shapes.

This module owns the reading of a convolution call's arguments (strides, padding, dimension
numbers, dtypes) into the few cases that `torch_conv` and `onednn.conv` run: plain 2-D NHWC
convolutions without dilation or groups, with symmetric padding and an HWIO kernel (flax's, what
`nn.Conv` passes) or an OHWI one (a channels-last PyTorch weight's bytes).
Anything else is left to XLA by the callers. It imports neither torch nor oneDNN.
"""

import functools
from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

# The kernel layouts that the CPU kernels take (dimension letters in memory order).
KERNEL_LAYOUTS = ('HWIO', 'OHWI')
_DTYPES = (jnp.float32, jnp.bfloat16)


def single_cpu_device() -> Tuple[bool, str]:
  """(whether this run has exactly one CPU device, why not): the host kernels' precondition. A
  host kernel would gather a sharded batch onto one host thread, and on an accelerator it would
  copy every activation to the host."""
  if jax.default_backend() != 'cpu' or jax.device_count() != 1:
    return False, (f'it runs convolutions on the host and needs a single CPU device; this run '
                   f'has {jax.device_count()} {jax.default_backend()} device(s)')
  return True, ''


def _spatial_and_features(kernel_shape, layout: str) -> Tuple[int, int, int]:
  """(kernel height, kernel width, output features) of an HWIO or OHWI kernel shape."""
  return tuple(kernel_shape[layout.index(axis)] for axis in 'HWO')


def output_shape(images_shape, kernel_shape, stride, padding, layout):
  """NHWC output shape of a convolution with symmetric (pad_h, pad_w) and an HWIO/OHWI kernel."""
  batch, height, width, _ = images_shape
  kernel_h, kernel_w, features = _spatial_and_features(kernel_shape, layout)
  out_h = (height + 2 * padding[0] - kernel_h) // stride[0] + 1
  out_w = (width + 2 * padding[1] - kernel_w) // stride[1] + 1
  return (batch, out_h, out_w, features)


def _symmetric_padding(padding, images_shape, kernel_shape, stride,
                       layout: str) -> Optional[Tuple[int, int]]:
  """(pad_h, pad_w) when each axis is padded equally on both sides, else None."""
  if isinstance(padding, str):
    window = _spatial_and_features(kernel_shape, layout)[:2]
    padding = jax.lax.padtype_to_pads(images_shape[1:3], window, stride, padding)
  pads = [tuple(int(p) for p in pair) for pair in padding]
  if any(low != high for low, high in pads):
    return None
  return pads[0][0], pads[1][0]


def _kernel_layout(dimension_numbers, images_shape, kernel_shape) -> Optional[str]:
  """'HWIO' or 'OHWI' for NHWC images and outputs with such a kernel; None for anything else."""
  if dimension_numbers is None:  # lax's default is NCHW
    return None
  as_numbers = functools.partial(jax.lax.conv_dimension_numbers, images_shape, kernel_shape)
  wanted = as_numbers(dimension_numbers)
  for layout in KERNEL_LAYOUTS:
    if wanted == as_numbers(('NHWC', layout, 'NHWC')):
      return layout
  return None


def plain_conv(lhs, rhs, window_strides: Sequence[int], padding, lhs_dilation=None,
               rhs_dilation=None, dimension_numbers=None, feature_group_count: int = 1,
               preferred_element_type=None) -> Optional[Tuple[Tuple[int, int], Tuple[int, int], str]]:
  """(stride, (pad_h, pad_w), kernel layout) when a `lax.conv_general_dilated` call is a plain
  2-D NHWC convolution that the host kernels take (no dilation or groups, symmetric padding,
  float32 or bfloat16, HWIO or OHWI kernel); None for anything else."""
  stride = tuple(int(s) for s in window_strides)
  plain = (lhs.ndim == 4 and feature_group_count == 1 and preferred_element_type is None
           and all(d == 1 for d in (lhs_dilation or (1, 1)))
           and all(d == 1 for d in (rhs_dilation or (1, 1)))
           and lhs.dtype == rhs.dtype and any(lhs.dtype == d for d in _DTYPES))
  layout = _kernel_layout(dimension_numbers, lhs.shape, rhs.shape) if plain else None
  pads = (_symmetric_padding(padding, lhs.shape, rhs.shape, stride, layout)
          if layout is not None else None)
  return None if pads is None else (stride, pads, layout)
