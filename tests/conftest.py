"""Shared pytest set-up: one JAX compilation cache for the whole test run, the tiny trained runs
several test files start from (each trained once per test run), and GPU tests that skip cleanly
without a GPU.

The compilation cache: on 2 CPU cores compiling a configs/test.py run's programs takes ~15 s and
running them ~2 s, and every `train.Trainer` (every test that trains, every `python -m
pcl_jax.main` a test starts) compiles them again. A persistent cache in a fresh directory per
test run, handed to child processes through JAX_COMPILATION_CACHE_DIR, compiles each program
once. A cache the developer set (JAX_COMPILATION_CACHE_DIR) is used as it is. Programs with host
callbacks (`runtime.conv_impl=torch`) are never cached and compile as before. Under pytest-xdist
(pytest.ini's `-n 2`) the controller's pytest_configure makes the directory before the workers
start; they inherit the variable, so all of them share one cache, and the controller removes it.

The shared runs (tests/runs.py; read-only: a test that writes into one works on
`runs.copy_run(...)`), trained once per worker that asks for them:
  tiny_run       1 epoch of 2 steps: checkpoint 1 (evaluation, CLI errors).
  two_epoch_run  configs/test.py as it is: checkpoints 1 and 2, sealed (damaged checkpoints,
                 results files).
  reference_run  3 epochs of 3 steps, checkpoints every 2 epochs, and its final state (exact
                 resume after a stop or a SIGTERM, determinism).
"""

import os
import shutil
import tempfile

import jax
import pytest

from tests import runs

_CACHE_VARIABLES = {'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
                    'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '0'}
_OWN_CACHE = []  # the directory this test run made (removed at its end)


def pytest_configure(config):
  """The test run's compilation cache, for this process and every child it starts."""
  del config
  if not os.environ.get('JAX_COMPILATION_CACHE_DIR'):
    directory = tempfile.mkdtemp(prefix='pcl_jax_tests_jax_cache_')
    _OWN_CACHE.append(directory)
    os.environ['JAX_COMPILATION_CACHE_DIR'] = directory
  for name, value in _CACHE_VARIABLES.items():
    os.environ.setdefault(name, value)
  jax.config.update('jax_compilation_cache_dir', os.environ['JAX_COMPILATION_CACHE_DIR'])
  jax.config.update('jax_persistent_cache_min_compile_time_secs',
                    float(os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS']))
  jax.config.update('jax_persistent_cache_min_entry_size_bytes',
                    int(os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES']))


def pytest_unconfigure(config):
  del config
  while _OWN_CACHE:
    shutil.rmtree(_OWN_CACHE.pop(), ignore_errors=True)


# The files that take a minute or more on 2 cores (a whole program each: docs/testing.md), run
# first, so that neither of pytest.ini's two workers is left running one of them alone at the end.
LONG_FILES = ('test_gpu_checks.py', 'test_study.py', 'test_cli_errors.py', 'test_parallel.py')


def pytest_collection_modifyitems(config, items):
  del config
  items.sort(key=lambda item: item.path.name not in LONG_FILES)  # stable: file order kept
  if jax.default_backend() == 'gpu':
    return
  skip_gpu = pytest.mark.skip(reason='needs a GPU (jax.default_backend() != "gpu")')
  for item in items:
    if 'gpu' in item.keywords:
      item.add_marker(skip_gpu)


# ----------------------------------------------------------------------------------------------
# Shared trained runs (tests/runs.py): each trained once per test run, read-only.


@pytest.fixture(scope='session')
def compilation_cache_dir():
  """The directory of this test run's JAX compilation cache."""
  return os.environ['JAX_COMPILATION_CACHE_DIR']


@pytest.fixture(scope='session')
def tiny_run(tmp_path_factory):
  """`runs.tiny_config()` trained: a run directory with checkpoint 1."""
  workdir = tmp_path_factory.mktemp('tiny_run') / 'run'
  runs.train_run(workdir, runs.tiny_config())
  return str(workdir)


@pytest.fixture(scope='session')
def two_epoch_run(tmp_path_factory):
  """`runs.two_epoch_config()` trained: checkpoints 1 and 2, each sealed (checksums.json)."""
  workdir = tmp_path_factory.mktemp('two_epoch_run') / 'run'
  runs.train_run(workdir, runs.two_epoch_config())
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['1', '2']
  return str(workdir)


@pytest.fixture(scope='session')
def reference_run(tmp_path_factory):
  """`runs.reference_config()` trained without interruption: (workdir, final state)."""
  workdir = tmp_path_factory.mktemp('reference_run') / 'run'
  return str(workdir), runs.train_run(workdir, runs.reference_config())
