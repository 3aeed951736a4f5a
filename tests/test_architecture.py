"""The package's layout holds: no import cycles, the algorithm importable without torch, and every
module saying what it owns."""

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, 'pcl_jax')


def _modules():
  """{dotted module name: path} of every module of pcl_jax."""
  modules = {}
  for directory, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith('.py'):
        path = os.path.join(directory, name)
        dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, '.')
        modules[dotted[:-len('.__init__')] if dotted.endswith('.__init__') else dotted] = path
  return modules


def _imports(path, modules):
  """The pcl_jax modules that `path` imports anywhere (module level or inside functions)."""
  found = set()
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names if alias.name in modules)
    elif isinstance(node, ast.ImportFrom) and node.module and node.module in modules:
      for alias in node.names:  # `from pcl_jax.x import y`: y is a module or a name in x
        submodule = f'{node.module}.{alias.name}'
        found.add(submodule if submodule in modules else node.module)
  return found


def _cycle(graph):
  """One import cycle of `graph` as a list of modules, or None."""
  state, stack = {}, []

  def visit(module):
    state[module] = 'open'
    stack.append(module)
    for target in sorted(graph[module]):
      if state.get(target) == 'open':
        return stack[stack.index(target):] + [target]
      if target not in state:
        cycle = visit(target)
        if cycle:
          return cycle
    stack.pop()
    state[module] = 'done'
    return None

  for module in sorted(graph):
    if module not in state:
      cycle = visit(module)
      if cycle:
        return cycle
  return None


def test_the_import_graph_has_no_cycle():
  modules = _modules()
  graph = {name: _imports(path, modules) - {name} for name, path in modules.items()}
  assert _cycle(graph) is None, ' -> '.join(_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
  assert _cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
  assert _cycle({'a': {'b'}, 'b': set()}) is None


@pytest.mark.parametrize('module', ['pcl_jax.models', 'pcl_jax.losses', 'pcl_jax.state',
                                    'pcl_jax.cluster_schedule', 'pcl_jax.step',
                                    'pcl_jax.configuration', 'pcl_jax.kernels'])
def test_the_algorithm_imports_without_torch(module):
  code = f'import {module}, sys; assert "torch" not in sys.modules, sorted(sys.modules)'
  result = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True,
                          text=True)
  assert result.returncode == 0, result.stderr[-2000:]


def test_every_module_opens_with_a_docstring():
  for name, path in _modules().items():
    docstring = ast.get_docstring(ast.parse(open(path).read()))
    assert docstring and docstring.strip(), f'{name} has no docstring saying what it owns'


def test_the_top_level_is_the_algorithm():
  """The run's infrastructure sits in run/, the tools in study/, the kernels in kernels/; the
  top of the package holds the algorithm and its entry points only."""
  package = os.path.join(ROOT, 'pcl_jax')
  top = {name[:-3] for name in os.listdir(package) if name.endswith('.py')}
  assert top == {'__init__', 'main', 'train', 'step', 'models', 'state', 'features',
                 'cluster_schedule', 'configuration', 'plot'}, sorted(top)
  subpackages = {name for name in os.listdir(package)
                 if os.path.isfile(os.path.join(package, name, '__init__.py'))}
  assert subpackages == {'clustering', 'data', 'evaluation', 'export', 'kernels', 'losses',
                         'run', 'study'}, sorted(subpackages)


def test_the_algorithm_never_imports_the_study_tools():
  modules = _modules()
  for name, path in modules.items():
    if not name.startswith(('pcl_jax.study', 'pcl_jax.plot')):
      assert not any(imported.startswith('pcl_jax.study') for imported in _imports(path, modules)), name
