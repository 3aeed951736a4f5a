"""host_memory.tune_malloc: big XLA buffers are reused instead of page-faulted in on every call."""

import os
import subprocess
import sys

import pytest

from pcl_jax.kernels import host_memory

_FAULTS_PER_CALL = """
import resource, sys
from pcl_jax.kernels import host_memory
host_memory.tune_malloc()  # before jax starts, as pcl_jax.main does (PCL_JAX_TUNE_MALLOC=0: skip)
import jax, jax.numpy as jnp
x = jnp.ones((16, 1024, 1024))  # 64 MiB: far above glibc's largest mmap threshold
add_one = jax.jit(lambda a: a + 1)
# The heap grows for the first calls (each output lands in fresh space until enough freed
# blocks line up: up to ~20 calls, 30 runs here), then every call reuses it.
for _ in range(25):
  add_one(x).block_until_ready()
faults = []
for _ in range(15):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  add_one(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
# The median call: a late heap-growth step (fresh pages) is not what is measured here.
print(host_memory.tune_malloc(), sorted(faults)[len(faults) // 2])
"""


def _faults_per_call(tune: str):
  env = dict(os.environ, PCL_JAX_TUNE_MALLOC=tune)
  out = subprocess.run([sys.executable, '-c', _FAULTS_PER_CALL], capture_output=True, text=True,
                       env=env, check=True,
                       cwd=os.path.dirname(os.path.dirname(__file__))).stdout.split()
  return out[0] == 'True', float(out[1])


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc malloc tuning only')
def test_tuning_stops_page_faults_on_reused_buffers():
  tuned, tuned_faults = _faults_per_call('1')
  untuned, untuned_faults = _faults_per_call('0')
  assert tuned and not untuned
  # 64 MiB is 16,384 pages: untuned, a typical call faults its output back in; tuned, none.
  assert untuned_faults > 8000
  assert tuned_faults < 1000


def test_tune_malloc_is_idempotent():
  first = host_memory.tune_malloc()
  assert host_memory.tune_malloc() == first


def test_importing_the_package_leaves_malloc_alone():
  """The program (`python -m pcl_jax.main`) tunes its own process; a library import does not."""
  code = ('import pcl_jax, pcl_jax.main, pcl_jax.train, pcl_jax.evaluation.driver\n'
          'from pcl_jax.kernels import host_memory\n'
          'print(host_memory._applied)\n')  # pylint: disable=protected-access
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True,
                       cwd=os.path.dirname(os.path.dirname(__file__))).stdout.strip()
  assert out == 'None'
