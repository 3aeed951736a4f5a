"""Tests of the package and its lock files: pyproject.toml's ranges, the pins, what the wheel ships.

Cheap: nothing is built or installed (docs/install.md says how the lock files are made).
"""

import fnmatch
import os
import re
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
import pytest
import setuptools

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU_LOCK, GPU_LOCK = 'requirements-lock.txt', 'requirements-lock-gpu.txt'
LOCK_EXTRAS = {CPU_LOCK: ('cpu', 'test'), GPU_LOCK: ('gpu', 'test')}
PIN = re.compile(r'[a-z0-9]+(?:-[a-z0-9]+)*==[0-9][0-9A-Za-z.+!]*')


def _pyproject():
  with open(os.path.join(ROOT, 'pyproject.toml'), 'rb') as f:
    return tomllib.load(f)


def _lines(name):
  """The lines of a lock file that are not comments or blank."""
  with open(os.path.join(ROOT, name)) as f:
    return [line.strip() for line in f if line.strip() and not line.lstrip().startswith('#')]


def _pins(name):
  """{canonical name: version} of a lock file."""
  pins = {}
  for line in _lines(name):
    package, version = line.split('==')
    assert canonicalize_name(package) not in pins, f'{name} pins {package} twice'
    pins[canonicalize_name(package)] = version
  return pins


def _requirements(extras):
  project = _pyproject()['project']
  lines = list(project['dependencies'])
  for extra in extras:
    lines += project['optional-dependencies'][extra]
  return [Requirement(line) for line in lines]


@pytest.mark.parametrize('lock', [CPU_LOCK, GPU_LOCK])
def test_every_lock_line_pins_one_exact_version(lock):
  lines = _lines(lock)
  assert len(lines) > 20, f'{lock} looks truncated'
  bad = [line for line in lines if not PIN.fullmatch(line)]
  assert not bad, f'{lock}: lines that are not `name==version` (canonical name): {bad}'
  assert 'pcl-jax' not in _pins(lock), f'{lock} must not list the package itself'
  names = [line.split('==')[0] for line in lines]
  assert names == sorted(names), f'{lock} is not sorted by name: regenerate it with .ci/lock'


@pytest.mark.parametrize('lock', [CPU_LOCK, GPU_LOCK])
def test_every_dependency_is_pinned_inside_its_range(lock):
  pins = _pins(lock)
  for requirement in _requirements(LOCK_EXTRAS[lock]):
    name = canonicalize_name(requirement.name)
    assert name in pins, f'{lock} lacks {requirement.name} ({requirement}): run .ci/lock'
    assert requirement.specifier.contains(pins[name], prereleases=True), (
        f'{lock} pins {name}=={pins[name]}, outside pyproject.toml\'s {requirement}: run .ci/lock')


def test_the_two_locks_share_versions_and_differ_only_in_the_machine_specific_packages():
  cpu, gpu = _pins(CPU_LOCK), _pins(GPU_LOCK)
  # faiss-cpu and faiss-gpu install the same `faiss` package: never both in one environment.
  assert [n for n in cpu if n.startswith('faiss')] == ['faiss-cpu']
  assert [n for n in gpu if n.startswith('faiss')] == ['faiss-gpu']
  # oneDNN's CPU build serves runtime.conv_impl=onednn, a single-CPU-device path (on a GPU
  # machine `auto` means XLA's convolutions), so the GPU lock leaves it out.
  cpu_only = {'faiss-cpu', 'onednn-cpu-gomp', 'onednn-devel-cpu-gomp'}
  assert cpu_only <= set(cpu) and not cpu_only & set(gpu)
  assert set(cpu) - cpu_only <= set(gpu), 'the GPU lock lacks packages the CPU lock has'
  differ = {n: (cpu[n], gpu[n]) for n in set(cpu) & set(gpu) if cpu[n] != gpu[n]}
  assert not differ, f'the locks pin different versions (cpu, gpu): {differ}'


def test_gpu_lock_pins_jaxs_cuda_plugin_at_jaxs_version():
  gpu, cpu = _pins(GPU_LOCK), _pins(CPU_LOCK)
  assert 'jax-cuda12-plugin' in gpu and 'jax-cuda12-pjrt' in gpu
  assert gpu['jax-cuda12-plugin'] == gpu['jax-cuda12-pjrt'] == gpu['jaxlib'] == gpu['jax']
  assert cpu['jaxlib'] == cpu['jax']
  assert not any(n.startswith('jax-cuda') for n in cpu)
  for pins in (cpu, gpu):  # the releases this machine's torch cap admits
    assert (pins['torch'], pins['torchvision']) == ('2.14.1', '0.29.1')


def test_requirements_txt_is_the_cpu_lock():
  with open(os.path.join(ROOT, 'requirements.txt')) as f:
    lines = [line.strip() for line in f if line.strip() and not line.startswith('#')]
  assert lines == [f'-r {CPU_LOCK}']


def test_the_wheel_takes_every_package_and_every_data_file():
  setuptools_config = _pyproject()['tool']['setuptools']
  find = setuptools_config['packages']['find']
  finder = (setuptools.find_namespace_packages if find.get('namespaces', True)
            else setuptools.find_packages)
  packages = set(finder(where=ROOT, include=find['include'], exclude=find.get('exclude', ())))
  for top in ('pcl_jax', 'configs'):
    for directory, subdirs, files in os.walk(os.path.join(ROOT, top)):
      subdirs[:] = [d for d in subdirs if d != '__pycache__']
      package = os.path.relpath(directory, ROOT).replace(os.sep, '.')
      if any(name.endswith('.py') for name in files):
        assert package in packages, f'the wheel would leave out {package}'
      data = [name for name in files if not name.endswith(('.py', '.pyc'))]
      patterns = setuptools_config.get('package-data', {}).get(package, [])
      left_out = [name for name in data if not any(fnmatch.fnmatch(name, p) for p in patterns)]
      assert not left_out, (f'{package}: {left_out} would not ship in the wheel; add them to '
                            'pyproject.toml\'s [tool.setuptools.package-data]')
