"""Runs many `python -m pcl_jax.main` command lines from one process that imported their
dependencies once (for tests/test_cli_errors.py).

  python tests/cli_forkserver.py CASES.json RESULTS.json JOBS

CASES.json is a list of {"args": [...], "stdout": path, "stderr": path}. Each case runs in a
forked child that executes `pcl_jax.main` as `__main__` (runpy, as `python -m` does) with argv
`args`, its stdout and stderr going to the two files, and exits with the program's status.
Only modules the program itself imports (on its way to training or evaluating) are imported
before the fork, and none defines a flag a fresh process would not (Orbax's are defined either
way), so a child does what a fresh `python -m pcl_jax.main ARGS` does but for the 2-5 s of
importing JAX, torch and Orbax again. At most JOBS children run at once. RESULTS.json gets
[{"status", "seconds"}] in case order.
"""

import json
import os
import runpy
import sys
import time
import traceback

# What `pcl_jax.main` imports on its way to training or evaluating; none starts a JAX backend.
# pylint: disable=unused-import
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
# pylint: enable=unused-import


def _redirect(path: str, fd: int) -> None:
  target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
  os.dup2(target, fd)
  os.close(target)


def _child(case) -> None:
  """In the forked child: runs the program; never returns."""
  status = 1
  try:
    _redirect(case['stdout'], 1)
    _redirect(case['stderr'], 2)
    sys.argv = ['pcl_jax/main.py', *case['args']]
    runpy.run_module('pcl_jax.main', run_name='__main__', alter_sys=True)
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
  cases_path, results_path, jobs = sys.argv[1], sys.argv[2], int(sys.argv[3])
  with open(cases_path) as handle:
    all_cases = json.load(handle)
  with open(results_path, 'w') as handle:
    json.dump(run_cases(all_cases, jobs), handle)
