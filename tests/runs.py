"""The tiny trained runs the test suite shares: their configs, how they are trained, and writable
copies of them. tests/conftest.py trains each once per test run (fixtures of pytest's widest
scope: `tiny_run`, `two_epoch_run`, `reference_run`); a test that writes into a run directory (a
resume, an evaluation, damage) works on `copy_run(...)` and leaves the shared one as it was.
"""

import os
import shutil

from configs import test as test_config


def tiny_config():
  """configs/test.py for 1 InfoNCE epoch of 2 steps: enough for checkpoint 1."""
  config = test_config.get_config()
  config.train.epochs = 1
  config.train.steps_per_epoch = 2
  return config


def two_epoch_config():
  """configs/test.py as it is: 2 epochs of 6 steps (the second with prototypes), checkpoints 1
  and 2."""
  return test_config.get_config()


def reference_config():
  """configs/test.py, shorter: 3 epochs of 3 steps, checkpoints every 2 epochs."""
  config = test_config.get_config()
  config.train.epochs = 3
  config.train.steps_per_epoch = 3
  config.clustering.nredo = 1
  config.checkpoint.every_epochs = 2
  return config


def train_run(workdir, config):
  """Trains `config` into `workdir`; the final state."""
  from pcl_jax import train  # pylint: disable=g-import-not-at-top
  return train.train_and_evaluate(config, str(workdir))


def copy_run(run_dir, tmp_path, name='run'):
  """A writable copy of a shared run directory under `tmp_path`; its path (str)."""
  workdir = os.path.join(str(tmp_path), name)
  shutil.copytree(run_dir, workdir)
  return workdir
