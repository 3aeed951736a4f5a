"""One XLA CPU thread when PyTorch's oneDNN kernels run the convolutions (`cpu_conv`).

Why: the convolutions run inside XLA's thread pool, and PyTorch's OpenMP runtime (libgomp)
gives every thread that calls it its own team of workers. With XLA's default pool (one thread
per core) two XLA threads call torch in turn, so a 2-core machine carries two teams: four busy
threads for two cores. libgomp then throttles its spin-waiting (it does so whenever it manages
more threads than there are CPUs), so its workers sleep and are woken around every parallel
region. Measured on the 2-core test machine, mini-ImageNet ResNet-18 step (84 px, batch 96):
each XLA and OpenMP thread was descheduled ~200 times a step with 22-48 ms a step waiting for a
core, and the process used 1.78 of its 2 cores, against 5-30 slices and 1.99 cores in PyTorch's
own step. With one XLA thread there is one team: 8-38 slices a step, 1.94 cores, the oneDNN
calls (copies included) took 1.15 s a step instead of 1.29-1.32 s, and XLA's own ops 0.19 s
instead of 0.17-0.19 s on two threads (they are small; they gain little from a second core).

So when the convolutions will run on torch, `limit_xla_threads` sets `PJRT_NPROC=1`, the size
of XLA's CPU client pool, which must happen before JAX creates that client. It leaves alone
runs where torch convolutions cannot run (several CPU devices, several processes, an
accelerator) and a user's own PJRT_NPROC. One consequence: with torch convolutions nothing else
in the process should run parallel torch ops on another thread (a second OpenMP team brings the
throttling back), which is why `benchmarks/` time the PyTorch reference in its own process.
"""

import importlib.util
import logging
import os
import re

import jax

log = logging.getLogger(__name__)

# The XLA CPU client reads its thread-pool size from here (xla/pjrt/cpu: DefaultThreadPoolSize).
THREADS_VARIABLE = 'PJRT_NPROC'


def _forced_cpu_device_count() -> int:
  """CPU devices requested through XLA_FLAGS or jax_num_cpu_devices (1 when neither is set)."""
  match = re.search(r'--xla_force_host_platform_device_count=(\d+)',
                    os.environ.get('XLA_FLAGS', ''))
  flag_count = int(match.group(1)) if match else 1
  config_count = getattr(jax.config, 'jax_num_cpu_devices', -1)
  return max(flag_count, config_count if config_count and config_count > 0 else 1)


def _accelerator_possible() -> bool:
  """Whether JAX may pick a GPU or TPU: JAX_PLATFORMS names one first, or (unset) a PJRT plugin
  or libtpu is installed. Then `model.conv_impl=auto` means XLA's convolutions anyway."""
  platforms = os.environ.get('JAX_PLATFORMS', '').strip()
  if platforms:
    return platforms.split(',')[0].strip() != 'cpu'
  return any(importlib.util.find_spec(name) is not None for name in ('jax_plugins', 'libtpu'))


def _backends_started() -> bool:
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    return xla_bridge.backends_are_initialized()
  except (ImportError, AttributeError):  # an API change: assume the worst, change nothing
    return True


def why_not_limited(conv_impl: str) -> str:
  """'' when `limit_xla_threads(conv_impl)` would set one XLA thread, else the reason not."""
  if conv_impl == 'xla':
    return "model.conv_impl='xla': XLA runs the convolutions and uses every core itself"
  for name in (THREADS_VARIABLE, 'NPROC'):
    if name in os.environ:
      return f'{name}={os.environ[name]} is set by the user'
  if _backends_started():
    return "JAX's backends are already running; the pool size is fixed"
  if _forced_cpu_device_count() > 1:
    return 'several CPU devices are requested: convolutions run in XLA'
  if jax.distributed.is_initialized():
    return 'a multi-process run: convolutions run in XLA'
  if _accelerator_possible():
    return 'an accelerator may run the step: convolutions run in XLA'
  return ''


def limit_xla_threads(conv_impl: str) -> bool:
  """Before JAX starts: one XLA CPU thread if torch will run the convolutions (see module doc).

  `conv_impl` is the `model.conv_impl` setting ('auto', 'torch' or 'xla'). Returns whether it
  set PJRT_NPROC=1.
  """
  if why_not_limited(conv_impl):
    return False
  os.environ[THREADS_VARIABLE] = '1'
  log.info('one XLA CPU thread (%s=1): PyTorch runs the convolutions with all cores',
           THREADS_VARIABLE)
  return True
