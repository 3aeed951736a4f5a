"""Tests of the set-up contract: the README's two commands, `.ci/run`, the requirement sets."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README_COMMANDS = (
    'pip install -r requirements.txt && python -m pcl_jax.main --config=configs/digits.py '
    '--workdir=runs/digits',
    'pip install -r requirements.txt && python -m pytest -q tests',
)


def _read(name):
  with open(os.path.join(ROOT, name)) as f:
    return f.read()


def requirement_names(name, seen=()):
  """Distribution names one `pip install -r NAME` asks for, following `-r` includes."""
  names = []
  for line in _read(name).splitlines():
    line = line.split('#', 1)[0].strip()
    if not line:
      continue
    if line.startswith('-r'):
      included = line[2:].strip()
      assert included not in seen, f'{name} includes {included} twice'
      names += requirement_names(included, seen + (name,))
      continue
    names.append(re.split(r'[\[<>=!~; ]', line, maxsplit=1)[0].lower())
  return names


def test_readme_opens_with_the_two_set_up_commands():
  commands = [line.strip() for line in _read('README.md').splitlines()
              if line.startswith('    pip install')]
  assert tuple(commands[:2]) == README_COMMANDS


def test_ci_runs_the_readmes_test_command():
  ci_lines = [line.strip() for line in _read('.ci/run').splitlines()]
  assert README_COMMANDS[1] in ci_lines


def test_each_install_set_has_one_faiss_and_the_gpu_set_has_the_cpu_sets_rest():
  cpu, gpu = requirement_names('requirements.txt'), requirement_names('requirements-gpu.txt')
  # faiss-cpu and faiss-gpu install the same `faiss` package: never both in one environment.
  assert [n for n in cpu if n.startswith('faiss')] == ['faiss-cpu']
  assert [n for n in gpu if n.startswith('faiss')] == ['faiss-gpu']
  # oneDNN's CPU build serves runtime.conv_impl=onednn, which runs on a single CPU device only
  # (on a GPU machine `auto` means XLA's convolutions), so the GPU set leaves it out.
  cpu_only = {'faiss-cpu', 'onednn-cpu-gomp', 'onednn-devel-cpu-gomp'}
  assert cpu_only <= set(cpu) and set(cpu) - cpu_only <= set(gpu)
  assert len(cpu) == len(set(cpu)), 'a package is listed twice'
  for required in ('jax', 'flax', 'optax', 'orbax-checkpoint', 'ml-collections', 'torch',
                   'torchvision', 'scikit-learn', 'pytest'):
    assert required in cpu, required
