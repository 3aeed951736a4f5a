"""Data parallelism: 8 fake CPU devices (and 2 processes x 4) compute what 1 device computes,
the E-step's clustering included with every backend (jax, faiss, auto)."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, 'parallel_worker.py')


def _run(out, devices, extra=()):
  return subprocess.Popen([sys.executable, WORKER, str(out), str(devices), *extra],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(process, timeout=600):
  stdout, stderr = process.communicate(timeout=timeout)
  assert process.returncode == 0, stderr[-4000:]
  return stdout


def _compare(a_path, b_path):
  a, b = np.load(a_path), np.load(b_path)
  assert sorted(a.files) == sorted(b.files)
  assert {name for name in a.files if name.startswith('faiss_')}  # every backend was run
  for name in a.files:
    if name.endswith('im2cluster'):
      # Near-ties may flip a handful of assignments under different reduction orders.
      assert np.mean(a[name] == b[name]) > 0.97
    else:
      np.testing.assert_allclose(a[name], b[name], rtol=2e-4, atol=2e-5, err_msg=name)


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """The 1-device and the 8-device run, side by side (independent processes)."""
  base = tmp_path_factory.mktemp('parallel')
  paths = {devices: base / f'devices{devices}.npz' for devices in (1, 8)}
  processes = {devices: _run(path, devices) for devices, path in paths.items()}
  outputs = {devices: _finish(process) for devices, process in processes.items()}
  return {'paths': paths, 'outputs': outputs}


@pytest.fixture(scope='module')
def one_device(runs):
  return runs['paths'][1]


def test_eight_devices_equal_one_device(runs):
  assert 'ok 8' in runs['outputs'][8]
  _compare(runs['paths'][1], runs['paths'][8])


# Eight devices in one process stay in the default run.
@pytest.mark.slow
def test_two_processes_of_four_devices_equal_one_device(one_device, tmp_path):
  with socket.socket() as probe:
    probe.bind(('localhost', 0))
    port = probe.getsockname()[1]
  out = tmp_path / 'multihost.npz'
  workers = [_run(out, 4, ['--process-id', str(p), '--num-processes', '2', '--port', str(port)])
             for p in range(2)]
  outputs = [_finish(w) for w in workers]
  assert all('ok 8' in o for o in outputs)
  _compare(one_device, out)


def _scaling_commands():
  """The fake-device commands of docs/scaling.md, as written: each a list of argv (one entry
  per process) with the environment variables it sets."""
  text = open(os.path.join(os.path.dirname(HERE), 'docs', 'scaling.md')).read()
  lines = [line.strip() for line in text.replace('\\\n', ' ').splitlines()]
  commands = [line for line in lines if line.startswith('XLA_FLAGS=')]
  assert len(commands) == 3, commands
  parsed = []
  for command in commands:
    words = command.rstrip('&').split()
    environment = dict(word.split('=', 1) for word in words if not word.startswith('-')
                       and '=' in word and word.split('=', 1)[0].isupper())
    parsed.append((environment, [w for w in words if w.split('=', 1)[0] not in environment]))
  return parsed


def _run_as_written(environment, argv, workdir, port):
  argv = [sys.executable if word == 'python' else word for word in argv]
  argv = [f'--workdir={workdir}' if word.startswith('--workdir=') else word for word in argv]
  argv = [f'--coordinator_address=localhost:{port}' if word.startswith('--coordinator_address')
          else word for word in argv]
  return subprocess.Popen(argv, cwd=os.path.dirname(HERE), env=dict(os.environ, **environment),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_the_documented_scaling_commands_run_as_written(tmp_path):
  """8 fake devices, then 2 processes of 4, with the default backend (faiss on a CPU): the
  E-step hands the sharded features to faiss."""
  eight, *two_processes = _scaling_commands()
  with socket.socket() as probe:
    probe.bind(('localhost', 0))
    port = probe.getsockname()[1]
  runs = [('eight', [_run_as_written(*eight, tmp_path / 'eight', port)])]
  runs.append(('two', [_run_as_written(*command, tmp_path / 'two', port)
                       for command in two_processes]))
  for name, processes in runs:
    for process in processes:
      _, stderr = process.communicate(timeout=600)
      assert process.returncode == 0, stderr[-4000:]
      assert 'E-step epoch 1' in stderr
    records = [json.loads(line) for line in open(tmp_path / name / 'metrics.jsonl')]
    assert [r['epoch'] for r in records] == [0, 1] and records[1]['loss_proto'] is not None
