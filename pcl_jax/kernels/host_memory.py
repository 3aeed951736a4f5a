"""Keeps large host buffers in the process instead of returning them to the OS after every use.

Why: glibc serves allocations above 32 MiB (and any allocation from a thread's secondary arena
that does not fit it) with a fresh `mmap` and unmaps them on free. XLA:CPU allocates every
activation of every step anew, so each one page-faults its memory back in: on the 2-core test
machine `x + 1` over a 115 MB array took 49 ms with 28,000 page faults per call, and 8 ms with
none after `tune_malloc()`. PyTorch's CPU tensors benefit the same way. The cost is that the
process keeps its peak heap (what a training process reaches anyway) instead of shrinking, and
that the heap first grows until freed blocks line up: repeating a 64 MiB `x + 1`, calls kept
landing in fresh space for up to ~20 calls (3-13 growth steps in 30 runs, a heap of ~0.6-0.8 GB)
before every call reused it.

It must run before the threads that allocate exist (XLA creates its CPU thread pool on first
use), which is why the program calls it first (`python -m pcl_jax.main`, and the benchmarks);
importing pcl_jax as a library leaves the process's allocator alone. Set `PCL_JAX_TUNE_MALLOC=0` to
leave the allocator alone.
"""

import ctypes
import ctypes.util
import os
import sys

# mallopt parameters from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
# glibc: -1 'disables trimming completely'; 2**31-1 would still trim a free heap top above 2 GiB.
_NEVER_TRIM = -1

_applied = None


def tune_malloc() -> bool:
  """Applies the settings once (glibc only); returns whether they are in effect."""
  global _applied
  if _applied is not None:
    return _applied
  _applied = False
  if os.environ.get('PCL_JAX_TUNE_MALLOC', '1') == '0' or not sys.platform.startswith('linux'):
    return _applied
  try:
    libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
    mallopt = libc.mallopt
  except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to tune
    return _applied
  # One arena: secondary arenas are capped at 64 MiB heaps, so big buffers from XLA's worker
  # threads would still be mmap-ed. No mmap, and never trim the heap top: freed buffers are
  # reused by the next step's allocations.
  _applied = bool(mallopt(_M_ARENA_MAX, 1) and mallopt(_M_MMAP_MAX, 0)
                  and mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM))
  return _applied
