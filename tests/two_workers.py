"""pytest plugin (pytest.ini: `-p tests.two_workers`): the default run on two pytest-xdist
workers, each taking whole files (`-n 2 --dist loadfile`; docs/testing.md says why), where
pytest-xdist is installed. One process where it is not (the lent GPU machine's image), and for
`-m gpu` (the GPU tests share the one device), so that `python -m pytest -q -m gpu tests` runs
anywhere as written. A `-n` on the command line (`-n 0`: one process) wins."""


def _marker_expression(args) -> str:
  """The last `-m` expression of the arguments (pytest.ini's addopts come first)."""
  expressions = [value for flag, value in zip(args, args[1:]) if flag == '-m']
  return expressions[-1] if expressions else ''


def pytest_load_initial_conftests(early_config, parser, args):
  del parser
  chosen = any(arg.startswith(('-n', '--numprocesses')) for arg in args)
  if (early_config.pluginmanager.has_plugin('xdist') and not chosen
      and _marker_expression(args).strip() != 'gpu'):
    args[:0] = ['-n', '2', '--dist', 'loadfile']
