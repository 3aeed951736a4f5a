"""2-D convolutions as XLA FFI custom calls on oneDNN (`runtime.conv_impl=onednn`), CPU only.

Why this exists: `torch_conv` runs the convolutions on PyTorch's oneDNN kernels, but torch
allocates each result itself, so every forward and backward output is copied into XLA's buffer
afterwards, and each call goes through Python and torch's dispatcher. Here `conv.cc` calls
oneDNN directly from a custom call and writes into XLA's buffers. Measured on the 2-core test
machine (`benchmarks/onednn_direct/`): ResNet-18's convolutions at 32 px, batch 64, 1.29 s a
step against 1.39 s through torch with the copies, and the whole jitted step 1.11x the
`torch_conv` step (44.5 against 40.3 img/s, 8 paired rounds in one process).

Scope: float32, HWIO kernels (flax's layout, what `nn.Conv` passes), symmetric padding, no
dilation or groups. oneDNN reorders the plain HWIO kernel into its preferred blocked layout on
each call (and d kernel back out of it), as it did from OHWI: a plain weight layout of either
kind would make it pick a reference kernel. Anything else (bfloat16, say) goes to
`torch_conv`, and from there to XLA, so the function is always safe to call. Like
`torch_conv`, one CPU device only. The library is `library`'s.
"""

import functools
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np

from pcl_jax.kernels import conv_args
from pcl_jax.kernels.onednn import library
from pcl_jax.kernels import torch_conv


def blocked_layout(images_shape, kernel_shape, stride) -> Tuple[bool, bool]:
  """(forward, input gradient) for NHWC images and an HWIO kernel: whether that pass runs on
  oneDNN's channel-blocked activation layout (copied in and out) instead of NHWC. For stride-1
  3x3 convolutions of >= 512 channels on small maps (ResNet's last stage; other kernel sizes
  were not measured), where oneDNN 3.2's jit kernels beat its NHWC brgemm ones: both passes on
  maps of <= 9 pixels (84 px inputs), the input gradient alone up to 16 (32 px).
  Measured on the 2-core Zen 5 test machine, 512 channels alone: at 3x3, batch 96,
  forward 7.9 against 9.5 ms and input gradient 7.1 against 10.0 (the mini-ImageNet step
  x1.025-1.036, `ffi_step.py --layer layout`); at 4x4, batch 64, the forward even and the input
  gradient 7.9 against 9.6. Every larger map was as fast or faster in NHWC. A fixed rule, not a
  per-run timing, so runs stay bit-reproducible."""
  wide = (kernel_shape[3] >= 512 and images_shape[3] >= 512 and tuple(stride) == (1, 1)
          and tuple(kernel_shape[:2]) == (3, 3))
  pixels = images_shape[1] * images_shape[2]
  return wide and pixels <= 9, wide and pixels <= 16


def _call(name: str, results, *operands, stride, padding):
  """The convolution custom call `name`; its last two operands are the images and kernel."""
  images, kernel = operands[-2:]
  blocked_forward, blocked_backward = blocked_layout(images.shape, kernel.shape, stride)
  return library.call(name, results, *operands, stride_h=np.int64(stride[0]),
                      stride_w=np.int64(stride[1]), pad_h=np.int64(padding[0]),
                      pad_w=np.int64(padding[1]), blocked_forward=blocked_forward,
                      blocked_backward=blocked_backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def onednn_conv(images, kernel, stride: Tuple[int, int], padding: Tuple[int, int]):
  """NHWC float32 images * HWIO float32 kernel -> NHWC, symmetric (pad_h, pad_w)."""
  shape = conv_args.output_shape(images.shape, kernel.shape, stride, padding, 'HWIO')
  return _call('forward', jax.ShapeDtypeStruct(shape, images.dtype), images, kernel,
               stride=stride, padding=padding)


def _forward(images, kernel, stride, padding):
  # symbolic_zeros: `perturbed` is False for a network's first layer, whose input is data, and
  # then only d kernel is computed.
  out = onednn_conv(images.value, kernel.value, stride, padding)
  return out, (images.value, kernel.value, images.perturbed)


def _backward(stride, padding, residuals, out_grad):
  images, kernel, images_need_grad = residuals
  out_grad = out_grad.astype(images.dtype)
  like = lambda array: jax.ShapeDtypeStruct(array.shape, array.dtype)
  if images_need_grad:
    return tuple(_call('backward', (like(images), like(kernel)), out_grad, images, kernel,
                       stride=stride, padding=padding))
  return None, _call('backward_kernel', like(kernel), out_grad, images, kernel, stride=stride,
                     padding=padding)


onednn_conv.defvjp(_forward, _backward, symbolic_zeros=True)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count: int = 1, precision=None,
                         preferred_element_type=None):
  """`lax.conv_general_dilated` that runs float32 NHWC/HWIO convolutions as oneDNN custom calls,
  anything else through `torch_conv` (torch, then XLA)."""
  plain = conv_args.plain_conv(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                               dimension_numbers, feature_group_count, preferred_element_type)
  if plain is None or lhs.dtype != jnp.float32 or plain[2] != 'HWIO':
    return torch_conv.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
        feature_group_count, precision, preferred_element_type)
  stride, pads, _ = plain
  return onednn_conv(lhs, rhs, stride, pads)
