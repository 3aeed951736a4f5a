"""The oneDNN custom-call library: found, built once, loaded and registered with XLA.

This module owns the shared library that holds every oneDNN custom call of `pcl_jax.kernels.onednn`
(`conv.cc`, `batch_norm.cc`, `max_pool.cc`, `residual.cc`, sharing `runtime.h`'s engine and
lock), and the two ways Python reaches it: `call` (an XLA FFI call of a registered target) and
`query_bytes` (a workspace size). It knows nothing of convolutions or batch norms.

What it needs: PyPI's CPU-only oneDNN (`onednn-cpu-gomp`, oneDNN 3.2, and its headers
`onednn-devel-cpu-gomp`: requirements.txt installs both) and a C++17 compiler (`$CXX`, else
g++). The library is built once per source and jaxlib version into `$PCL_JAX_CACHE` (default
~/.cache/pcl_jax), in ~5 s. libdnnl uses GNU OpenMP; with torch imported first its
`libgomp.so.1` is torch's own copy, so the process keeps one OpenMP runtime.
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

from pcl_jax.kernels import torch_conv

# The sources of the one library (its custom calls share runtime.h's lock).
_HERE = pathlib.Path(__file__).parent
SOURCES = tuple(_HERE / name for name in ('conv.cc', 'batch_norm.cc', 'max_pool.cc', 'residual.cc'))
HEADERS = (_HERE / 'runtime.h',)
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


def available(build: bool = False) -> Tuple[bool, str]:
  """(whether runtime.conv_impl=onednn can run here, why not); `build`: also build (or find) the
  library, so that a compiler or header problem counts as unavailable instead of failing later."""
  available, reason = torch_conv.available()  # one CPU device; torch for fallbacks
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
      logging.warning('runtime.conv_impl=auto: not using oneDNN custom calls: %s', error)
      return False, str(error)
  return True, ''


def _cache_dir() -> pathlib.Path:
  return pathlib.Path(os.environ.get('PCL_JAX_CACHE', os.path.expanduser('~/.cache/pcl_jax')))


@functools.lru_cache(maxsize=None)
def library_path() -> pathlib.Path:
  """The built custom-call library, compiling it first if this source and jaxlib lack one."""
  prefix = _onednn_prefix()
  if prefix is None or _compiler() is None:
    raise RuntimeError(f'runtime.conv_impl=onednn needs oneDNN and a compiler: {INSTALL_HINT}')
  include = jax.ffi.include_dir()
  code = b''.join(path.read_bytes() for path in SOURCES + HEADERS)
  digest = hashlib.sha256(code + f'{jax.__version__} {include} {prefix}'.encode())
  target = _cache_dir() / f'pcl_onednn-{digest.hexdigest()[:16]}.so'
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
