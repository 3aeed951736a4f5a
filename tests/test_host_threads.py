"""host_threads: one XLA CPU thread when PyTorch runs a ResNet's convolutions, else XLA's own
default, and runtime.xla_cpu_threads sets the count outright; checked on real XLA thread pools."""

import os
import subprocess
import sys

import jax
import pytest

from pcl_jax.kernels import host_threads

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Prints the thread count the limit set, then the number of XLA pool threads once a jitted op
# ran (XLA names them tf_XLAEigen; nothing here calls torch, whose OpenMP workers would inherit
# the name).
_PROBE = '''
import os, sys
from pcl_jax.kernels import host_threads
print(host_threads.limit_xla_threads(sys.argv[1], sys.argv[2], int(sys.argv[3])))
import jax, jax.numpy as jnp
jax.jit(lambda x: x * 2)(jnp.ones(1024)).block_until_ready()
names = [open(f'/proc/self/task/{t}/comm').read().strip() for t in os.listdir('/proc/self/task')]
print(sum(name == 'tf_XLAEigen' for name in names))
'''


def _probe(conv_impl, arch='resnet18', requested=0, **environment):
  env = {k: v for k, v in os.environ.items() if k not in ('PJRT_NPROC', 'NPROC', 'XLA_FLAGS')}
  env.update(JAX_PLATFORMS='cpu', **environment)
  out = subprocess.run([sys.executable, '-c', _PROBE, conv_impl, arch, str(requested)],
                       capture_output=True, text=True, env=env, cwd=ROOT, check=True).stdout.split()
  return int(out[0]), int(out[1])


needs_proc = pytest.mark.skipif(not sys.platform.startswith('linux'),
                                reason='counts threads through /proc')


@needs_proc
def test_torch_convolutions_of_a_resnet_get_one_xla_thread():
  assert _probe('auto') == (1, 1)
  assert _probe('torch', 'resnet50') == (1, 1)
  assert _probe('xla', 'conv4', requested=3) == (3, 3)  # the setting wins


@needs_proc
def test_xla_convolutions_and_several_devices_keep_every_core():
  cores = len(os.sched_getaffinity(0))
  if cores < 2:
    pytest.skip('one core: XLA has one thread anyway')
  assert _probe('xla') == (0, cores)
  assert _probe('auto', 'conv4') == (0, cores)  # its XLA ops need every core
  assert _probe('auto', XLA_FLAGS='--xla_force_host_platform_device_count=2') == (0, cores)
  assert _probe('auto', PJRT_NPROC=str(cores)) == (0, cores)  # a user's own setting wins


def test_a_users_variable_and_a_started_backend_are_left_alone(monkeypatch):
  monkeypatch.setenv('PJRT_NPROC', '3')
  assert host_threads.choose_xla_threads('auto', 'resnet18') == (
      0, 'PJRT_NPROC=3 is set by the user')
  monkeypatch.delenv('PJRT_NPROC')
  monkeypatch.delenv('NPROC', raising=False)
  jax.devices()  # the test process's backend is running
  threads, why = host_threads.choose_xla_threads('auto', 'resnet18', requested=2)
  assert threads == 0 and 'already running' in why
  assert host_threads.limit_xla_threads('auto', 'resnet18') == 0
  assert 'PJRT_NPROC' not in os.environ
