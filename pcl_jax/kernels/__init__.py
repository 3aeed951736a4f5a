"""The optional CPU kernels, and the one place that chooses them: `select(runtime.conv_impl)`.

A model computes the same function whichever kernels run it; only the speed differs (results
agree to float rounding). The choice is therefore a runtime setting (`runtime.conv_impl`), never
part of a checkpoint's identity, and the model receives it as a `Kernels` value. The model's
layers are flax's own, in flax's layouts (HWIO conv kernels), and each takes its op from the set
at one seam: `nn.Conv(conv_general_dilated=kernels.conv)`, and `GroupedBatchNorm`'s training
statistics from `kernels.batch_norm`, which is handed the norm's activation (a plain function)
and fuses those it knows. A kernel that prefers another weight layout reorders inside itself, so
no layout or fused-op option reaches the model or its checkpoints. The sets:

- `xla`: XLA's convolutions, pure-JAX batch norm (`fused_batch_norm`) and max-pool (`max_pool`).
  Runs and shards everywhere (CPU, GPU, TPU, many devices).
- `torch`: convolutions on PyTorch's CPU kernels through host callbacks (`torch_conv`).
- `onednn`: convolutions, a ResNet's BN + ReLU, stem pool and residual joins as XLA custom calls
  on oneDNN (`onednn/`), built with the machine's C++ compiler.
- `auto`: on a single CPU device onednn where it builds, else torch; XLA anywhere else.

This package also holds the process-level CPU tuning that these kernels need: `host_threads`
(XLA's CPU thread count) and `host_memory` (glibc malloc settings). Importing it is cheap: the
kernel modules (which import torch) load only when `select` asks for them.
"""

import dataclasses
import functools
from typing import Callable

from pcl_jax import configuration
from pcl_jax.configuration import UserError


@dataclasses.dataclass(frozen=True)
class Kernels:
  """The ops a model takes from its kernel set. Each has the signature of the XLA op it replaces
  and falls back to it outside its own scope (dtype, layout, shape), so any input is safe.

  Attributes:
    name: the resolved `runtime.conv_impl` ('xla', 'torch' or 'onednn').
    conv: `jax.lax.conv_general_dilated`'s signature.
    batch_norm: `fused_batch_norm.grouped_batch_norm(x, scale, bias, num_groups, epsilon,
      activation) -> (activation(out), mean [G, C], var [G, C])`, training mode; fuses the
      activations it knows (`jax.nn.relu`, `max_pool.relu_max_pool_2x2`) and applies any other.
    max_pool: `max_pool.max_pool(x, window, stride, padding)`.
    residual_join: `(y, shortcut) -> relu(y + shortcut)`.
  """
  name: str
  conv: Callable
  batch_norm: Callable
  max_pool: Callable
  residual_join: Callable


def relu_join(y, shortcut):
  """XLA's residual join: relu(y + shortcut)."""
  import jax  # pylint: disable=g-import-not-at-top
  return jax.nn.relu(y + shortcut)


# Cached: one Kernels value per set, so models built with the same set compare equal.
@functools.lru_cache(maxsize=None)
def _xla() -> Kernels:
  import jax  # pylint: disable=g-import-not-at-top
  from pcl_jax.kernels import fused_batch_norm  # pylint: disable=g-import-not-at-top
  from pcl_jax.kernels import max_pool  # pylint: disable=g-import-not-at-top
  return Kernels('xla', jax.lax.conv_general_dilated, fused_batch_norm.grouped_batch_norm,
                 max_pool.max_pool, relu_join)


@functools.lru_cache(maxsize=None)
def _torch() -> Kernels:
  from pcl_jax.kernels import torch_conv  # pylint: disable=g-import-not-at-top
  return dataclasses.replace(_xla(), name='torch', conv=torch_conv.conv_general_dilated)


@functools.lru_cache(maxsize=None)
def _onednn() -> Kernels:
  # pylint: disable=g-import-not-at-top
  from pcl_jax.kernels.onednn import batch_norm
  from pcl_jax.kernels.onednn import conv
  from pcl_jax.kernels.onednn import max_pool
  from pcl_jax.kernels.onednn import residual
  # pylint: enable=g-import-not-at-top
  return Kernels('onednn', conv.conv_general_dilated, batch_norm.grouped_batch_norm,
                 max_pool.pooled, residual.join)


_BUILDERS = {'xla': _xla, 'torch': _torch, 'onednn': _onednn}


def resolve(conv_impl: str) -> str:
  """'xla', 'torch' or 'onednn' for a `runtime.conv_impl` setting, on this machine.

  Raises:
    UserError: an unknown value, or a named kernel set that cannot run here (with the fix).
  """
  # pylint: disable=g-import-not-at-top
  from pcl_jax.kernels import torch_conv
  from pcl_jax.kernels.onednn import library
  # pylint: enable=g-import-not-at-top
  if conv_impl not in configuration.CONV_IMPLS:
    raise UserError(f'runtime.conv_impl={conv_impl!r} is unknown; use one of '
                    f'{", ".join(configuration.CONV_IMPLS)}')
  if conv_impl == 'onednn':
    available, reason = library.available()
    if not available:
      raise UserError(f'runtime.conv_impl=onednn cannot run here: {reason}. Install it with '
                      f'{library.INSTALL_HINT}, or use runtime.conv_impl=auto.')
    return conv_impl
  available, reason = torch_conv.available()
  if conv_impl == 'auto':
    if not available:
      return 'xla'
    return 'onednn' if library.available(build=True)[0] else 'torch'
  if conv_impl == 'torch' and not available:
    raise UserError(f'runtime.conv_impl=torch cannot run here: {reason}. Use '
                    'runtime.conv_impl=auto (or xla).')
  return conv_impl


def select(conv_impl: str = 'xla') -> Kernels:
  """The kernel set for a `runtime.conv_impl` setting (see `resolve`)."""
  name = 'xla' if conv_impl == 'xla' else resolve(conv_impl)
  return _BUILDERS[name]()
