"""Runs many `python -m pcl_jax.main` (or `pcl_jax.study`) command lines from one process that
imported their dependencies once (for the tests of the programs' one-line errors).

  python tests/cli_forkserver.py CASES.json RESULTS.json JOBS

CASES.json is a list of {"args": [...], "stdout": path, "stderr": path, "module": name}
("module" defaults to pcl_jax.main). Each case runs in a forked child that executes the module
as `__main__` (runpy, as `python -m` does) with argv `args`, its stdout and stderr going to the
two files, and exits with the program's status. Only modules the programs themselves import (on
their way to training or evaluating) are imported before the fork, and none defines a flag a
fresh process would not (Orbax's are defined either way), so a child does what a fresh
`python -m MODULE ARGS` does but for the 2-5 s of importing JAX, torch and Orbax again. At most
JOBS children run at once. RESULTS.json gets [{"status", "seconds"}] in case order.

Tests call `run_commands(...)`, which starts the server and reads back what each case printed.
"""

import json
import os
import runpy
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = 'pcl_jax.main'


def run_commands(named_args, base, env=None, module=MAIN, jobs=2, timeout=480):
  """{name: CompletedProcess} of `python -m MODULE ARGS` (cwd = the repository root, environment
  `env` or this process's) for each `named_args` entry, each run in a child forked from one
  server process; its files under `base` (a pathlib.Path)."""
  env = dict(os.environ if env is None else env)
  env['PYTHONPATH'] = os.pathsep.join([ROOT, env.get('PYTHONPATH', '')])
  cases = [{'args': list(args), 'module': module, 'stdout': str(base / f'{name}.out'),
            'stderr': str(base / f'{name}.err')} for name, args in named_args.items()]
  cases_path, results_path = base / f'cases_{len(cases)}.json', base / f'results_{len(cases)}.json'
  with open(cases_path, 'w') as handle:
    json.dump(cases, handle)
  server = subprocess.run([sys.executable, os.path.abspath(__file__), str(cases_path),
                           str(results_path), str(jobs)],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=timeout)
  assert server.returncode == 0, server.stderr[-3000:]
  with open(results_path) as handle:
    statuses = json.load(handle)
  results = {}
  for (name, args), case, status in zip(named_args.items(), cases, statuses):
    with open(case['stdout']) as out, open(case['stderr']) as err:
      result = subprocess.CompletedProcess(list(args), status['status'], out.read(), err.read())
    result.seconds = status['seconds']
    results[name] = result
  return results


def _import_dependencies() -> None:
  """What the programs import on their way to training or evaluating; none starts a JAX
  backend."""
  # pylint: disable=unused-import,g-import-not-at-top
  import absl.app
  import jax
  import ml_collections
  import numpy
  import orbax.checkpoint
  import torch
  import torchvision
  from pcl_jax import configuration
  from pcl_jax.data import loaders
  from pcl_jax.evaluation import driver
  from pcl_jax.kernels import host_threads
  from pcl_jax.run import cli
  from pcl_jax.run import files as run_files
  from pcl_jax.run import parallel
  from pcl_jax import train
  from pcl_jax.study import runner
  # pylint: enable=unused-import,g-import-not-at-top


def _redirect(path: str, fd: int) -> None:
  target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
  os.dup2(target, fd)
  os.close(target)


def _child(case) -> None:
  """In the forked child: runs the program; never returns."""
  import traceback  # pylint: disable=g-import-not-at-top
  status = 1
  try:
    _redirect(case['stdout'], 1)
    _redirect(case['stderr'], 2)
    module = case.get('module', MAIN)
    sys.argv = [os.path.join(*module.split('.')) + '.py', *case['args']]
    runpy.run_module(module, run_name='__main__', alter_sys=True)
    status = 0
  except SystemExit as done:
    code = done.code
    status = code if isinstance(code, int) else (0 if code is None else 1)
  except BaseException:  # pylint: disable=broad-except
    traceback.print_exc()
  finally:
    for stream in (sys.stdout, sys.stderr):
      try:
        stream.flush()
      except Exception:  # pylint: disable=broad-except
        pass
    os._exit(status)  # pylint: disable=protected-access


def run_cases(cases, jobs: int):
  """Runs the cases, at most `jobs` at once; [{'status', 'seconds'}] in case order."""
  results = [None] * len(cases)
  running = {}  # pid -> (index, start)
  pending = list(enumerate(cases))
  while pending or running:
    while pending and len(running) < jobs:
      index, case = pending.pop(0)
      sys.stdout.flush()
      sys.stderr.flush()
      pid = os.fork()
      if pid == 0:
        _child(case)
      running[pid] = (index, time.monotonic())
    pid, wait_status = os.wait()
    index, start = running.pop(pid)
    results[index] = {'status': os.waitstatus_to_exitcode(wait_status),
                      'seconds': time.monotonic() - start}
  return results


if __name__ == '__main__':
  _import_dependencies()
  cases_path, results_path, jobs = sys.argv[1], sys.argv[2], int(sys.argv[3])
  with open(cases_path) as handle:
    all_cases = json.load(handle)
  with open(results_path, 'w') as handle:
    json.dump(run_cases(all_cases, jobs), handle)
