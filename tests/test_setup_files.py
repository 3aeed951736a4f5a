"""Tests of the set-up contract: the README's two commands and `.ci/run` (the lock files they
install: test_packaging.py)."""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README_COMMANDS = (
    'pip install -r requirements-lock.txt -e . && python -m pcl_jax.main '
    '--config=configs/digits.py --workdir=runs/digits',
    'pip install -r requirements-lock.txt -e . && python -m pytest -q tests',
)


def _read(name):
  with open(os.path.join(ROOT, name)) as f:
    return f.read()


def test_readme_opens_with_the_two_set_up_commands():
  commands = [line.strip() for line in _read('README.md').splitlines()
              if line.startswith('    pip install')]
  assert tuple(commands[:2]) == README_COMMANDS


def test_ci_runs_the_readmes_test_command():
  ci_lines = [line.strip() for line in _read('.ci/run').splitlines()]
  assert README_COMMANDS[1] in ci_lines
