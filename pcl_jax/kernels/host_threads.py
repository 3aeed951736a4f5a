"""XLA's CPU thread count: one thread when PyTorch's oneDNN kernels run a ResNet's convolutions.

Why: the convolutions run inside XLA's thread pool (`torch_conv`), and PyTorch's OpenMP runtime
(libgomp) gives every thread that calls it its own team of workers. With XLA's default pool (a
thread per core) two XLA threads call torch in turn, so a 2-core machine carries two teams:
four busy threads for two cores, and libgomp throttles its spin-waiting whenever it manages more
threads than there are CPUs, so its workers sleep and are woken around every parallel region.
Measured on the 2-core test machine, mini-ImageNet ResNet-18 step (84 px, batch 96): each XLA
and OpenMP thread was descheduled ~200 times a step, and the process used 1.78 of its 2 cores,
against 5-30 deschedules and 1.99 cores in PyTorch's own step. With one XLA thread there is one
team: 8-40 deschedules, 1.94 cores; the oneDNN calls (copies included) took 1.15 s a step
instead of 1.29-1.32 s, and XLA's own ops 0.19 s on one thread. Paired A/B (two processes
taking turns, 8 rounds): that step 1.075x faster with one thread (every round 1.05-1.13x),
ResNet-18 at 32 px even (0.99x), Conv4 at 84 px 0.89x slower -- its step spends far more of its
time in XLA's own ops (BN + ReLU + pool over 115 MB activations), which need every core.

So `choose_xla_threads` picks one thread when torch will run a ResNet's convolutions, and XLA's
default otherwise; `runtime.xla_cpu_threads` > 0 sets the count outright. It must act before JAX
creates its CPU client (`PJRT_NPROC`, read once by XLA), which is why `pcl_jax.main` calls
`limit_xla_threads` first thing. A user's own PJRT_NPROC always wins. One consequence: with
torch convolutions nothing else in the process should run parallel torch ops on another thread
(a second OpenMP team brings the throttling back), which is why `benchmarks/` time the PyTorch
reference in a process of its own.
"""

import importlib.util
import logging
import os
import re
from typing import Tuple

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
  or libtpu is installed. Then `runtime.conv_impl=auto` means XLA's convolutions anyway."""
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


def choose_xla_threads(conv_impl: str, arch: str, requested: int = 0) -> Tuple[int, str]:
  """(XLA CPU threads to set, why); 0 threads: leave XLA's default (a thread per core).

  Args:
    conv_impl, arch: the `runtime.conv_impl` and `model.arch` settings.
    requested: `runtime.xla_cpu_threads`; > 0 sets that many, 0 chooses (see the module doc).
  """
  for name in (THREADS_VARIABLE, 'NPROC'):
    if name in os.environ:
      return 0, f'{name}={os.environ[name]} is set by the user'
  if _backends_started():
    return 0, "JAX's backends are already running; the pool size is fixed"
  if requested > 0:
    return requested, f'runtime.xla_cpu_threads={requested}'
  if conv_impl == 'xla':
    return 0, "runtime.conv_impl='xla': XLA runs the convolutions and uses every core itself"
  if _forced_cpu_device_count() > 1:
    return 0, 'several CPU devices are requested: convolutions run in XLA'
  if jax.distributed.is_initialized():
    return 0, 'a multi-process run: convolutions run in XLA'
  if _accelerator_possible():
    return 0, 'an accelerator may run the step: convolutions run in XLA'
  if arch == 'conv4':
    return 0, ("Conv4's step spends much of its time in XLA's own ops (BN over large "
               'activations), which need every core')
  return 1, 'PyTorch runs the convolutions: one OpenMP team, one XLA thread'


def limit_xla_threads(conv_impl: str, arch: str, requested: int = 0) -> int:
  """Before JAX starts: sets PJRT_NPROC as `choose_xla_threads` says; returns the thread count
  it set (0: none, XLA's default). `log_choice` reports it once the run is under way."""
  global _choice
  threads, why = choose_xla_threads(conv_impl, arch, requested)
  if threads:
    os.environ[THREADS_VARIABLE] = str(threads)
    _choice = f'{threads} XLA CPU thread(s) ({THREADS_VARIABLE}={threads}): {why}'
  return threads


_choice = ''  # what limit_xla_threads set, for log_choice


def log_choice() -> None:
  """Logs the thread count `limit_xla_threads` set, if any (after start-up checks, which print
  nothing but their error)."""
  if _choice:
    log.info('%s', _choice)
