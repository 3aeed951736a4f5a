"""Kernel and thread choices are runtime settings, not model identity: a checkpoint resumes and
evaluates under any of them, and run directories that stored them under `model` still resume."""

import json
import logging
import os
import shutil

import jax
import numpy as np

from configs import default as default_config
from configs import test as test_config
from pcl_jax import configuration
from pcl_jax.evaluation import driver
from pcl_jax.run import checkpoint as checkpoint_lib
from pcl_jax.run import files as run_files
from pcl_jax import train
from tests import runs

LEGACY_RUN = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', 'legacy_run')


def _config(epochs: int, conv_impl: str):
  config = test_config.get_config()
  config.train.epochs = epochs
  config.runtime.conv_impl = conv_impl
  config.eval.fewshot_episodes = 20
  return config


def _epochs(workdir: str):
  return [record['epoch'] for record in run_files.read_metrics(
      os.path.join(workdir, 'metrics.jsonl'))]


def test_a_run_resumes_and_evaluates_under_another_kernel_set(tiny_run, tmp_path):
  workdir = runs.copy_run(tiny_run, tmp_path)  # 1 epoch of 2 steps under runtime.conv_impl=auto
  assert json.load(open(os.path.join(workdir, 'config.json')))['runtime']['conv_impl'] == 'auto'
  config = _config(2, 'xla')  # another kernel set: no refusal
  config.train.steps_per_epoch = runs.tiny_config().train.steps_per_epoch
  train.train_and_evaluate(config, workdir)
  assert _epochs(workdir) == [0, 1]
  assert checkpoint_lib.read_meta(workdir, 2)['model'] == {
      'arch': 'conv4', 'dim': 16, 'mlp': False, 'small_stem': False, 'width': 8}
  results = driver.evaluate_checkpoint(_config(2, 'torch'), workdir)
  assert results['checkpoint_step'] == 2 and 0.0 <= results['knn_top1'] <= 100.0


def test_a_run_directory_with_kernel_choices_under_model_still_resumes(tmp_path, caplog):
  workdir = str(tmp_path / 'legacy_run')
  shutil.copytree(LEGACY_RUN, workdir)
  saved = checkpoint_lib.read_meta(workdir, 1)['model']
  assert saved['conv_impl'] == 'auto' and 'conv_impl' in json.load(
      open(os.path.join(workdir, 'config.json')))['model']  # the older format, as written then
  with caplog.at_level(logging.WARNING, logger='pcl_jax'):
    train.train_and_evaluate(_config(2, 'xla'), workdir)
  assert _epochs(workdir) == [0, 1]
  # The moved fields read as their new names: only the real change is reported.
  changed = [r.getMessage() for r in caplog.records if 'changed settings' in r.getMessage()]
  assert len(changed) == 1 and 'runtime.conv_impl' in changed[0]
  assert 'model.conv_impl' not in changed[0] and 'xla_cpu_threads' not in changed[0]
  assert 'runtime' in json.load(open(os.path.join(workdir, 'config.json')))
  # Its OHWI kernels were upgraded on restore; what the resumed run wrote is today's format.
  assert 'conv_kernel_layout' not in checkpoint_lib.read_meta(workdir, 2)
  results = driver.evaluate_checkpoint(_config(2, 'auto'), workdir)
  assert results['checkpoint_step'] == 2


def _saved_arrays(workdir: str, step: int) -> dict:
  """Checkpoint `step`'s state as Orbax reads it from disk: no template, no upgrade."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  return ocp.StandardCheckpointer().restore(
      os.path.join(checkpoint_lib.step_dir(workdir, step), 'state'))


def _leaves(tree) -> dict:
  return {jax.tree_util.keystr(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _as_saved(path: str, array):
  """A restored leaf in the legacy run's format: conv kernels [out, kh, kw, in] (OHWI)."""
  if path.endswith("['kernel']") and array.ndim == 4:
    return np.transpose(array, (3, 0, 1, 2))
  return array


def test_the_legacy_runs_ohwi_kernels_restore_as_flax_hwio_for_resume_and_evaluation(tmp_path):
  """checkpoint.UPGRADES: the legacy run's meta says conv_kernel_layout='OHWI'; both restores
  give flax's HWIO kernels, the saved arrays transposed, and every other leaf as saved."""
  workdir = str(tmp_path / 'legacy_run')
  shutil.copytree(LEGACY_RUN, workdir)
  assert checkpoint_lib.read_meta(workdir, 1)['conv_kernel_layout'] == 'OHWI'
  raw = _leaves(_saved_arrays(workdir, 1))
  evaluated, meta, _ = checkpoint_lib.restore_for_eval(workdir, 1)
  assert 'conv_kernel_layout' not in meta
  evaluated = _leaves(evaluated)
  assert evaluated.keys() == raw.keys()
  kernels = [path for path in raw if path.endswith("['kernel']") and raw[path].ndim == 4]
  assert len(kernels) == 4 * 3  # Conv4's, in params, key_params and the momentum
  for path, array in evaluated.items():
    np.testing.assert_array_equal(_as_saved(path, array), raw[path], err_msg=path)
  config = _config(2, 'xla')
  template = train.Trainer(config, workdir, configuration.validate(config)).initial_state()
  checkpointer = checkpoint_lib.Checkpointer(workdir)
  try:
    state, meta = checkpointer.restore(template, 1)
  finally:
    checkpointer.close()
  assert 'conv_kernel_layout' not in meta
  for field in ('params', 'key_params', 'batch_stats', 'key_batch_stats'):
    restored = _leaves({field: getattr(state, field)})
    assert restored and restored.keys() <= raw.keys()
    shapes = {path: leaf.shape for path, leaf in _leaves({field: getattr(template, field)}).items()}
    assert {path: array.shape for path, array in restored.items()} == shapes
    for path, array in restored.items():
      np.testing.assert_array_equal(_as_saved(path, array), raw[path], err_msg=path)
  assert state.params['backbone']['Conv_0']['kernel'].shape == (3, 3, 3, 8)  # HWIO


def test_saved_configs_are_read_with_moved_fields_at_their_new_places():
  old = {'model': {'arch': 'conv4', 'conv_impl': 'torch', 'xla_cpu_threads': 2}, 'seed': 0}
  upgraded = configuration.upgrade_saved_config(old)
  assert upgraded['runtime'] == {'conv_impl': 'torch', 'xla_cpu_threads': 2}
  assert upgraded['model']['arch'] == 'conv4' and 'conv_impl' not in upgraded['model']
  assert upgraded['seed'] == 0
  assert old['model']['conv_impl'] == 'torch'  # the input is left as it was


def test_saved_configs_get_fields_added_since_at_their_defaults():
  saved = {'model': {'arch': 'conv4', 'width': 32}, 'pcl': {'temperature': 0.1}}
  upgraded = configuration.upgrade_saved_config(saved)
  defaults = default_config.get_config()
  assert upgraded['model']['width'] == 32 and upgraded['pcl']['temperature'] == 0.1
  assert upgraded['pcl']['instance_loss'] == 'infonce'
  assert upgraded['model']['dim'] == defaults.model.dim
  assert 'data' not in upgraded  # only sections the run saved are completed


def test_a_config_file_with_a_moved_field_says_where_it_went():
  config = test_config.get_config()
  with config.unlocked():
    config.model.conv_impl = 'xla'
  try:
    configuration.check_fields(config)
  except configuration.UserError as error:
    assert 'model.conv_impl' in str(error) and 'it is now runtime.conv_impl' in str(error)
  else:
    raise AssertionError('a config with model.conv_impl passed the field check')
