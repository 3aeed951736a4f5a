"""Reliability: kill/resume exactness, SIGTERM saves, nothing non-finite saved, determinism,
finished runs left alone, partial checkpoints and torn metrics lines harmless, no unpickling."""

import glob
import json
import os
import re
import shutil
import signal
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pcl_jax import configuration
from pcl_jax.run import checkpoint as checkpoint_lib
from pcl_jax.run import files as run_files
from pcl_jax.run import stop as stop_lib
from pcl_jax import train
from tests import runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
import kill_resume  # pylint: disable=g-import-not-at-top,wrong-import-position

TIMING_FIELDS = kill_resume.TIMING_FIELDS


def _config():
  """configs/test.py, shorter: 3 epochs of 3 steps, checkpoints every 2 epochs (the shared
  `reference_run`'s)."""
  return runs.reference_config()


def _records(workdir):
  return run_files.read_metrics(os.path.join(workdir, 'metrics.jsonl'))


def _without_timings(records):
  return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in records]


def _leaves(state):
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(state)]


def _steps(workdir):
  return sorted(int(name) for name in os.listdir(checkpoint_lib.checkpoint_dir(workdir))
                if name.isdigit())


@pytest.fixture(name='reference')
def fixture_reference(reference_run):
  """The shared uninterrupted run of `_config()`: (workdir, final state)."""
  return reference_run


# ----------------------------------------------------------------------------------------------
# Kill anywhere.


# benchmarks/kill_resume.py runs 20 kills; the SIGTERM resume test stays in the default run.
@pytest.mark.slow
def test_kill_resume_three_trials_no_corruption_exact_result(tmp_path):
  """benchmarks/kill_resume.py, 3 SIGKILLs (checkpoint write, E-step, step), real CLI."""
  results = kill_resume.run(kill_resume.parse_args([
      '--trials=3', '--epochs=3', '--phases=checkpoint,estep,step',
      '--override=--config.clustering.nredo=1', '--override=--config.train.steps_per_epoch=4',
      f'--workdir={tmp_path}', '--timeout=300']))
  assert results['trials'] == 3
  assert results['corrupted_checkpoints'] == 0, results['corrupted']
  assert not results['problems'], results['problems']
  assert results['max_param_diff'] <= 1e-5, results['max_param_diff_at']
  assert results['max_metric_diff'] <= 1e-5, results['max_metric_diff_at']
  assert results['passed']


def test_sigterm_mid_epoch_saves_epoch_start_and_resume_is_exact(reference, tmp_path):
  reference_dir, reference_state = reference
  workdir = str(tmp_path / 'run')
  metrics_path = os.path.join(workdir, 'metrics.jsonl')
  polls_after_epoch_0 = []

  def send_sigterm_in_epoch_1():
    # Polled twice after epoch 0's record, once before epoch 1, then after every step: the
    # 4th poll is after epoch 1's first step (epoch 1's start is not checkpointed: every 2).
    if run_files.read_metrics(metrics_path):
      polls_after_epoch_0.append(1)
      if len(polls_after_epoch_0) == 4:
        signal.raise_signal(signal.SIGTERM)  # synchronous, unlike os.kill
    return False

  previous_handler = signal.getsignal(signal.SIGTERM)
  with pytest.raises(stop_lib.TrainingInterrupted, match='SIGTERM: stopped in epoch 1') as info:
    train.train_and_evaluate(_config(), workdir, should_stop=send_sigterm_in_epoch_1)
  assert info.value.signum == signal.SIGTERM
  assert signal.getsignal(signal.SIGTERM) is previous_handler  # handlers restored
  assert _steps(workdir) == [1]  # the epoch-1 start state, saved on the way out
  assert [r['epoch'] for r in _records(workdir)] == [0]

  resumed = train.train_and_evaluate(_config(), workdir)
  assert _without_timings(_records(workdir)) == _without_timings(_records(reference_dir))
  for a, b in zip(_leaves(reference_state), _leaves(resumed)):
    np.testing.assert_array_equal(a, b)


def test_same_config_and_seed_give_identical_metrics_on_cpu(reference, tmp_path):
  reference_dir, reference_state = reference
  workdir = str(tmp_path / 'again')
  state = train.train_and_evaluate(_config(), workdir)
  assert _without_timings(_records(workdir)) == _without_timings(_records(reference_dir))
  for a, b in zip(_leaves(reference_state), _leaves(state)):
    np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------------------------
# Non-finite values.


def test_non_finite_state_is_never_saved(tmp_path, monkeypatch):
  config = _config()
  config.checkpoint.every_epochs = 1
  original = train.Trainer.run_epoch

  def run_epoch_poisoning_epoch_1(self, state, epoch, **kwargs):
    state, record = original(self, state, epoch, **kwargs)
    if epoch == 1:  # the loss stays finite: only the parameters went bad
      state = state.replace(params=jax.tree_util.tree_map(lambda x: x * jnp.nan, state.params))
    return state, record

  monkeypatch.setattr(train.Trainer, 'run_epoch', run_epoch_poisoning_epoch_1)
  workdir = str(tmp_path)
  with pytest.raises(FloatingPointError,
                     match=r'non-finite values in the training state after epoch 1 \(state\.params'):
    train.train_and_evaluate(config, workdir)
  assert _steps(workdir) == [1]  # the last good checkpoint stays the latest
  assert [r['epoch'] for r in _records(workdir)] == [0]


@pytest.mark.parametrize('name', ['loss', 'loss_proto', 'acc_inst'])
def test_non_finite_epoch_metric_names_epoch_and_quantity(name):
  record = {'epoch': 4, 'loss': 1.0, 'loss_inst': 1.0, 'loss_proto': 0.5, 'acc_inst': 3.0,
            'acc_proto': 2.0, name: float('nan')}
  with pytest.raises(FloatingPointError, match=rf'non-finite {name}=nan \(mean over epoch 4\)'):
    train._check_finite(record)  # pylint: disable=protected-access


def test_check_state_finite_names_the_array():
  state = {'params': {'w': jnp.ones(3), 'b': jnp.array([0.0, jnp.inf])}, 'step': jnp.int32(3)}
  train._check_state_finite({'params': {'w': jnp.ones(3)}}, 0)  # pylint: disable=protected-access
  with pytest.raises(FloatingPointError, match=r"after epoch 2 \(state\['params'\]\['b'\]\)"):
    train._check_state_finite(state, 2)  # pylint: disable=protected-access


# ----------------------------------------------------------------------------------------------
# Reruns, leftovers and files.


def test_rerun_of_a_finished_workdir_reports_it_and_changes_nothing(reference, tmp_path, capsys):
  workdir = str(tmp_path / 'finished')
  shutil.copytree(reference[0], workdir)
  # Leftovers of a save killed mid-write: Orbax never lists them; the rerun removes them.
  partial = os.path.join(workdir, 'checkpoints', '4.orbax-checkpoint-tmp-1234567')
  os.makedirs(os.path.join(partial, 'state'))
  with open(os.path.join(partial, 'state', 'junk'), 'w') as handle:
    handle.write('half a checkpoint')
  checkpointer = checkpoint_lib.Checkpointer(workdir)
  assert checkpointer.latest_epoch() == 3
  checkpointer.close()
  before = {name: open(os.path.join(workdir, name)).read()
            for name in ('metrics.jsonl', 'config.json')}
  state = train.train_and_evaluate(_config(), workdir)
  assert 'is finished: 3 epochs done' in capsys.readouterr().out
  assert not glob.glob(os.path.join(workdir, 'checkpoints', '*orbax-checkpoint-tmp*'))
  assert _steps(workdir) == _steps(reference[0])
  for name, text in before.items():
    assert open(os.path.join(workdir, name)).read() == text
  for a, b in zip(_leaves(reference[1]), _leaves(state)):
    np.testing.assert_array_equal(a, b)


def test_torn_metrics_line_is_skipped_and_dropped_on_resume(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  path.write_text('{"epoch": 0, "loss": 1.5}\n{"epoch": 1, "loss": 1.2}\n{"epoch": 2, "lo')
  assert [r['epoch'] for r in run_files.read_metrics(str(path))] == [0, 1]
  metrics_log = run_files.MetricsLog(str(tmp_path), tensorboard=False)
  metrics_log.truncate_from(2)  # what a resume from checkpoint 2 does
  metrics_log.append({'epoch': 2, 'loss': 1.0})
  lines = path.read_text().splitlines()
  assert [json.loads(line)['epoch'] for line in lines] == [0, 1, 2]


def test_json_files_are_replaced_atomically(tmp_path, monkeypatch):
  path = str(tmp_path / 'results.json')
  run_files.write_json_atomic(path, {'a': 1})

  def crash(*args, **kwargs):
    raise OSError('disk full')

  monkeypatch.setattr(os, 'replace', crash)
  with pytest.raises(OSError):
    run_files.write_json_atomic(path, {'a': 2})
  assert json.load(open(path)) == {'a': 1}  # the old file is intact
  assert os.listdir(tmp_path) == ['results.json']  # and no temporary is left


def test_evaluate_and_training_write_through_the_atomic_writers():
  source = open(os.path.join(ROOT, 'pcl_jax', 'evaluation', 'driver.py')).read()
  assert 'run_files.write_json_atomic(path, results)' in source
  assert not re.search(r"open\([^)]*results[^)]*'w'", source)


def test_workdir_lock_excludes_a_second_trainer(tmp_path):
  with run_files.WorkdirLock(str(tmp_path)):
    with pytest.raises(run_files.WorkdirError, match=f'in use by another training process '
                       fr'\(pid {os.getpid()}\)'):
      run_files.WorkdirLock.check_free(str(tmp_path))
  run_files.WorkdirLock.check_free(str(tmp_path))  # released


def test_stop_request_first_signal_sets_flag_second_interrupts():
  # A CI job started in the background by a non-interactive shell inherits SIGINT ignored, and
  # StopRequest rightly leaves an ignored signal alone: give this test Python's default.
  inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    with stop_lib.StopRequest() as stop:
      assert not stop()
      signal.raise_signal(signal.SIGINT)  # delivered to this thread before it returns
      assert stop() and stop.reason == 'SIGINT'
      with pytest.raises(KeyboardInterrupt):
        signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
  finally:
    signal.signal(signal.SIGINT, inherited)


# A torch.load call without weights_only=True among its arguments.
UNSAFE_TORCH_LOAD = r'torch\.load\((?![^)]*weights_only=True)'


def test_nothing_is_unpickled():
  """README 'Files and safety': no pickle, torch.load only with weights_only=True (tensors
  alone: pcl_jax.export.from_pcl), np.load never allows pickles."""
  for path in glob.glob(os.path.join(ROOT, 'pcl_jax', '**', '*.py'), recursive=True):
    source = open(path).read()
    assert not re.search(r'\bimport pickle|\bpickle\.load|' + UNSAFE_TORCH_LOAD +
                         r'|allow_pickle\s*=\s*True|\bcloudpickle|\bdill\b|joblib\.load',
                         source), path
  assert re.search(UNSAFE_TORCH_LOAD, 'torch.load(path)')
  assert not re.search(UNSAFE_TORCH_LOAD, "torch.load(path, map_location='cpu', weights_only=True)")


def test_every_shipped_config_has_exactly_the_default_fields():
  import importlib  # pylint: disable=g-import-not-at-top
  for path in sorted(glob.glob(os.path.join(ROOT, 'configs', '*.py'))):
    name = os.path.basename(path)[:-3]
    if name == '__init__':
      continue
    configuration.check_fields(importlib.import_module(f'configs.{name}').get_config())
