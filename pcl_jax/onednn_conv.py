"""2-D convolutions as XLA FFI custom calls on oneDNN (`model.conv_impl=onednn`), CPU only.

Why this exists: `cpu_conv` runs the convolutions on PyTorch's oneDNN kernels, but torch
allocates each result itself, so every forward and backward output is copied into XLA's buffer
afterwards, and each call goes through Python and torch's dispatcher. Here `onednn_conv.cc`
calls oneDNN directly from a custom call and writes into XLA's buffers. Measured on the 2-core
test machine (session 10, `benchmarks/onednn_direct/`): ResNet-18's convolutions at 32 px,
batch 64, 1.29 s a step against 1.39 s through torch with the copies, and the whole jitted step
1.11x the `cpu_conv` step (44.5 against 40.3 img/s, 8 paired rounds in one process).

What it needs: PyPI's CPU-only oneDNN (`onednn-cpu-gomp`, oneDNN 3.2, and its headers
`onednn-devel-cpu-gomp`: requirements.txt installs both) and a C++17 compiler (`$CXX`, else
g++). The shared library is built once per source and jaxlib version into
`$PCL_JAX_CACHE` (default ~/.cache/pcl_jax), in ~5 s. libdnnl uses GNU OpenMP; with torch
imported first its `libgomp.so.1` is torch's own copy, so the process keeps one OpenMP runtime.

The same library holds `onednn_batch_norm`'s, `onednn_max_pool`'s and `onednn_residual`'s custom
calls (sources listed in SOURCES, sharing `onednn_runtime.h`'s engine and lock); this module
builds, loads and registers it for all four.

Scope: float32, OHWI kernels (pcl_jax's layout), symmetric padding, no dilation or groups.
Anything else (bfloat16, say) goes to `cpu_conv`'s torch path, and from there to XLA, so the
function is always safe to call. Like `cpu_conv`, one CPU device only.
"""

import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from pcl_jax import cpu_conv

# The custom-call library: these convolutions, `onednn_batch_norm`'s, `onednn_max_pool`'s and
# `onednn_residual`'s, sharing one lock.
_HERE = pathlib.Path(__file__).parent
SOURCES = (_HERE / 'onednn_conv.cc', _HERE / 'onednn_batch_norm.cc', _HERE / 'onednn_max_pool.cc',
           _HERE / 'onednn_residual.cc')
HEADERS = (_HERE / 'onednn_runtime.h',)
INSTALL_HINT = ('pip install onednn-cpu-gomp==2023.2.0 onednn-devel-cpu-gomp==2023.2.0 '
                '(requirements.txt) and a C++ compiler (g++)')
# Registered name (pcl_onednn_<name>) -> handler symbol.
_TARGETS = {'forward': 'PclConvForward', 'backward': 'PclConvBackward',
            'backward_kernel': 'PclConvBackwardKernel',
            'batch_norm_forward': 'PclBatchNormForward',
            'batch_norm_backward': 'PclBatchNormBackward',
            'max_pool_forward': 'PclMaxPoolForward', 'max_pool_backward': 'PclMaxPoolBackward',
            'residual_forward': 'PclResidualForward'}


def _onednn_prefix() -> Optional[pathlib.Path]:
  """The install prefix holding oneDNN's library and headers (pip puts them under sys.prefix)."""
  for prefix in dict.fromkeys((sys.prefix, sys.base_prefix, os.path.expanduser('~/.local'))):
    path = pathlib.Path(prefix)
    if ((path / 'lib' / 'libdnnl.so.3').exists()
        and (path / 'include' / 'oneapi' / 'dnnl' / 'dnnl.hpp').exists()):
      return path
  return None


def _compiler() -> Optional[str]:
  return shutil.which(os.environ.get('CXX', 'g++'))


def onednn_conv_available(build: bool = False) -> Tuple[bool, str]:
  """(whether model.conv_impl=onednn can run here, why not); `build`: also build (or find) the
  library, so that a compiler or header problem counts as unavailable instead of failing later."""
  available, reason = cpu_conv.torch_conv_available()  # one CPU device; torch for fallbacks
  if not available:
    return False, reason
  if not hasattr(jax, 'ffi'):
    return False, f'jax {jax.__version__} has no jax.ffi'
  if _onednn_prefix() is None:
    return False, f'oneDNN is not installed under {sys.prefix}'
  if _compiler() is None:
    return False, f'no C++ compiler ({os.environ.get("CXX", "g++")}) on PATH'
  if build:
    try:
      library_path()
    except RuntimeError as error:
      logging.warning('model.conv_impl=auto: not using oneDNN custom calls: %s', error)
      return False, str(error)
  return True, ''


def _cache_dir() -> pathlib.Path:
  return pathlib.Path(os.environ.get('PCL_JAX_CACHE', os.path.expanduser('~/.cache/pcl_jax')))


@functools.lru_cache(maxsize=None)
def library_path() -> pathlib.Path:
  """The built custom-call library, compiling it first if this source and jaxlib lack one."""
  prefix = _onednn_prefix()
  if prefix is None or _compiler() is None:
    raise RuntimeError(f'model.conv_impl=onednn needs oneDNN and a compiler: {INSTALL_HINT}')
  include = jax.ffi.include_dir()
  code = b''.join(path.read_bytes() for path in SOURCES + HEADERS)
  digest = hashlib.sha256(code + f'{jax.__version__} {include} {prefix}'.encode())
  target = _cache_dir() / f'onednn_conv-{digest.hexdigest()[:16]}.so'
  if target.exists():
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  # Build beside the target and rename: concurrent processes never load a half-written file.
  with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
    built = pathlib.Path(scratch) / target.name
    command = [_compiler(), '-O2', '-std=c++17', '-shared', '-fPIC', *map(str, SOURCES),
               f'-I{prefix / "include"}', f'-I{include}', f'-L{prefix / "lib"}', '-ldnnl',
               f'-Wl,-rpath,{prefix / "lib"}', '-o', str(built)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode:
      sources = ', '.join(path.name for path in SOURCES)
      raise RuntimeError(f'building {sources} failed ({" ".join(command)}):\n'
                         f'{result.stderr[-3000:]}')
    os.replace(built, target)
  return target


@functools.lru_cache(maxsize=None)
def register() -> ctypes.CDLL:
  """Loads the library and registers its custom calls with XLA (once per process)."""
  library = ctypes.cdll.LoadLibrary(str(library_path()))
  for name, symbol in _TARGETS.items():
    jax.ffi.register_ffi_target(f'pcl_onednn_{name}', jax.ffi.pycapsule(getattr(library, symbol)),
                                platform='cpu')
  return library


def query_bytes(symbol: str, argtypes, *args, what: str) -> int:
  """The library's `int64_t symbol(args...)` that sizes a primitive's workspace (-1: oneDNN
  cannot make the primitive, a RuntimeError naming `what`)."""
  query = getattr(register(), symbol)
  query.restype = ctypes.c_int64
  query.argtypes = argtypes
  size = query(*args)
  if size < 0:
    raise RuntimeError(f'oneDNN has no {what}')
  return size


def call(name: str, results, *operands, aliases=None, **attributes):
  """The custom call `pcl_onednn_<name>` (registering the library first); `aliases`: {operand
  index: result index} whose buffer the result may take over (XLA copies the operand first if
  anything else still reads it)."""
  register()
  return jax.ffi.ffi_call(f'pcl_onednn_{name}', results, input_output_aliases=aliases)(
      *operands, **attributes)


def blocked_layout(images_shape, kernel_shape, stride) -> Tuple[bool, bool]:
  """(forward, input gradient): whether that pass runs on oneDNN's channel-blocked activation
  layout (copied in and out) instead of NHWC. For stride-1 3x3 convolutions of >= 512 channels
  on small maps (ResNet's last stage; other kernel sizes were not measured), where oneDNN 3.2's
  jit kernels beat its NHWC brgemm ones: both passes on maps of <= 9 pixels (84 px inputs), the
  input gradient alone up to 16 (32 px).
  Measured on the 2-core Zen 5 test machine (session 12), 512 channels alone: at 3x3, batch 96,
  forward 7.9 against 9.5 ms and input gradient 7.1 against 10.0 (the mini-ImageNet step
  x1.025-1.036, `ffi_step.py --layer layout`); at 4x4, batch 64, the forward even and the input
  gradient 7.9 against 9.6. Every larger map was as fast or faster in NHWC. A fixed rule, not a
  per-run timing, so runs stay bit-reproducible."""
  wide = (kernel_shape[0] >= 512 and images_shape[3] >= 512 and tuple(stride) == (1, 1)
          and tuple(kernel_shape[1:3]) == (3, 3))
  pixels = images_shape[1] * images_shape[2]
  return wide and pixels <= 9, wide and pixels <= 16


def _call(name: str, results, *operands, stride, padding):
  """The convolution custom call `name`; its last two operands are the images and kernel."""
  images, kernel = operands[-2:]
  blocked_forward, blocked_backward = blocked_layout(images.shape, kernel.shape, stride)
  return call(name, results, *operands, stride_h=np.int64(stride[0]),
              stride_w=np.int64(stride[1]), pad_h=np.int64(padding[0]),
              pad_w=np.int64(padding[1]), blocked_forward=blocked_forward,
              blocked_backward=blocked_backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def onednn_conv(images, kernel, stride: Tuple[int, int], padding: Tuple[int, int]):
  """NHWC float32 images * OHWI float32 kernel -> NHWC, symmetric (pad_h, pad_w)."""
  shape = cpu_conv.output_shape(images.shape, kernel.shape, stride, padding, 'OHWI')
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
  """`lax.conv_general_dilated` that runs float32 NHWC/OHWI convolutions as oneDNN custom calls,
  anything else through `cpu_conv` (torch, then XLA)."""
  plain = cpu_conv.plain_conv(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                              dimension_numbers, feature_group_count, preferred_element_type)
  if plain is None or lhs.dtype != jnp.float32 or plain[2] != 'OHWI':
    return cpu_conv.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
        feature_group_count, precision, preferred_element_type)
  stride, pads, _ = plain
  return onednn_conv(lhs, rhs, stride, pads)
