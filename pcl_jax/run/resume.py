"""Resuming a run: what a checkpoint must share with the config, and restoring it.

This module owns the checks and repairs made when a run directory is reopened: the remains of
an interrupted save are removed; a damaged checkpoint (checksums, meta or arrays that do not
read) is set aside in WORKDIR/checkpoints_damaged/ with a warning and the newest intact one is
used; its settings are compared with the config (before any data or model is built, so a
mismatch fails in seconds); the state and the cluster schedule are restored; and config.json
records what changed. Which checkpoint to save and when is `pcl_jax.train`'s; the on-disk
format is `checkpoint`'s.
"""

import json
import logging
import os
import shutil
from typing import Optional

from pcl_jax import cluster_schedule
from pcl_jax import configuration
from pcl_jax.configuration import UserError
from pcl_jax.run import checkpoint as checkpoint_lib
from pcl_jax.run import files as run_files
from pcl_jax.run import parallel

log = logging.getLogger(__name__)

# Where damaged checkpoints are moved (WORKDIR/checkpoints_damaged/<epochs_done>): out of Orbax's
# sight, never deleted.
DAMAGED_DIR = 'checkpoints_damaged'


def remove_partial_checkpoints(workdir: str) -> None:
  """Deletes `*.orbax-checkpoint-tmp*` directories left by a save that was killed.

  Orbax writes a checkpoint into such a directory and renames it when complete, so these are
  never listed as checkpoints; removing them only reclaims their disk space. Safe because the
  workdir lock guarantees that no other process is saving into this directory.
  """
  for best in (False, True):
    directory = checkpoint_lib.checkpoint_dir(workdir, best)
    if not os.path.isdir(directory):
      continue
    for name in os.listdir(directory):
      if '.orbax-checkpoint-tmp' in name:
        shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
        log.info('removed %s, the remains of an interrupted checkpoint save', name)


def _meta_problem(workdir: str, step: int):
  """(meta, None) of checkpoint `step`, or (None, why it is damaged)."""
  problem = checkpoint_lib.damage(checkpoint_lib.step_dir(workdir, step))
  if problem:
    return None, problem
  try:
    return checkpoint_lib.read_meta(workdir, step), None
  except Exception as error:  # pylint: disable=broad-except
    return None, f'its meta cannot be read ({type(error).__name__})'


def _check_fits(config, meta: dict, path: str) -> None:
  """UserError when a checkpoint with this `meta` cannot resume under `config`: another network
  (`models.IDENTITY_FIELDS`), another image size or queue length, or a cluster schedule that its
  saved controller state does not fit."""
  checkpoint_lib.check_model_matches(config, meta, path)
  for setting, key, current in (('data.image_size', 'image_size', config.data.image_size),
                                ('pcl.num_negatives', 'num_negatives',
                                 config.pcl.num_negatives)):
    if meta.get(key) is not None and meta[key] != current:
      raise UserError(
          f'checkpoint {path} was trained with {setting}={meta[key]} but the config has '
          f'{current}; resume with --config.{setting}={meta[key]} or pass a new --workdir')
  try:
    cluster_schedule.ClusterSchedule.from_config(config.schedule).load_state_dict(
        meta['schedule'])
  except ValueError as error:
    raise UserError(f'{error} ({path})') from error


def set_aside(checkpointer, workdir: str, step: int, problem: str) -> str:
  """Moves damaged checkpoint `step` to WORKDIR/checkpoints_damaged/ (renamed, never deleted);
  returns what happened, for the warning (or the error, when no intact checkpoint is left)."""
  source = checkpoint_lib.step_dir(workdir, step)
  target_dir = os.path.join(os.path.abspath(workdir), DAMAGED_DIR)
  target, copy = os.path.join(target_dir, str(step)), 1
  while os.path.exists(target):
    target, copy = os.path.join(target_dir, f'{step}.{copy}'), copy + 1
  if parallel.is_main_process():  # the others share its files: they wait, then reread
    os.makedirs(target_dir, exist_ok=True)
    os.rename(source, target)
  parallel.barrier(f'set_aside_checkpoint_{step}')
  checkpointer.reload()
  return f'checkpoint {source} is damaged ({problem}); moved it to {target}'


def _report(moved, step: int) -> None:
  """Warns of the checkpoints set aside on the way to checkpoint `step` (once each)."""
  for what in moved:
    log.warning('%s; resuming from checkpoint %d', what, step)
  moved.clear()


def _no_intact_checkpoint(workdir: str, moved) -> UserError:
  damaged_dir = os.path.join(os.path.abspath(workdir), DAMAGED_DIR)
  what = ''
  if moved:
    what = f' ({moved[0]}{f"; and {len(moved) - 1} more" if len(moved) > 1 else ""})'
  return UserError(
      f'no intact checkpoint in {checkpoint_lib.checkpoint_dir(workdir)}{what}: the damaged ones '
      f'are set aside in {damaged_dir}; restore one from a copy, or start over with a new '
      '--workdir (or after deleting that directory)')


def resumable_step(config, workdir: str, checkpointer, moved=None) -> Optional[int]:
  """The newest intact checkpoint, or None for a fresh run; fast (meta and checksums only).

  Damaged checkpoints on the way are set aside (`set_aside`), with a warning once an intact one
  is found. UserError when the newest intact one was trained with settings this config cannot
  take (`_check_fits`), or when checkpoints existed but none is intact (then the error, not a
  warning, says what was set aside). `moved` collects what was set aside and not yet reported.
  """
  moved = [] if moved is None else moved
  damaged_dir = os.path.join(os.path.abspath(workdir), DAMAGED_DIR)
  while True:
    step = checkpointer.latest_epoch()
    if step is None:
      # Also on a rerun after every checkpoint was set aside: never a silent fresh start.
      if moved or (os.path.isdir(damaged_dir) and os.listdir(damaged_dir)):
        raise _no_intact_checkpoint(workdir, moved)
      return None
    meta, problem = _meta_problem(workdir, step)
    if problem is None:
      _check_fits(config, meta, checkpoint_lib.step_dir(workdir, step))
      _report(moved, step)
      return step
    moved.append(set_aside(checkpointer, workdir, step, problem))


def _mismatch_error(workdir: str, step: int, error: Exception) -> UserError:
  """The UserError for an intact checkpoint that does not restore into this config's state."""
  path = checkpoint_lib.step_dir(workdir, step)
  first_line = str(error).strip().splitlines()[0] if str(error).strip() else ''
  reason = f'{type(error).__name__}: {first_line[:160]}{"..." if len(first_line) > 160 else ""}'
  return UserError(
      f'checkpoint {path} does not fit this config\'s training state ({reason}); resume with the '
      f'settings it was trained with ({os.path.join(workdir, "config.json")}) or pass a new '
      '--workdir')


def restore(config, checkpointer, workdir: str, step: Optional[int], initial_state, schedule):
  """(state, epochs_done): checkpoint `step` (from `resumable_step`) restored into the structure
  of `initial_state`, `schedule` taking its saved controller state; (initial_state, 0) when
  `step` is None. A checkpoint that turns out damaged only now (one without checksums) is set
  aside and the next intact one restored instead."""
  moved = []
  while step is not None:
    try:
      state, meta = checkpointer.restore(initial_state, step)
    except Exception as error:  # pylint: disable=broad-except
      problem = checkpoint_lib.readable(workdir, step)
      if problem is None:  # it reads as saved: it was trained with other settings
        raise _mismatch_error(workdir, step, error) from error
      moved.append(set_aside(checkpointer, workdir, step, problem))
      step = resumable_step(config, workdir, checkpointer, moved)
      continue
    schedule.load_state_dict(meta['schedule'])
    return state, int(meta['epochs_done'])
  return initial_state, 0


def write_config(workdir: str, config, resumed: bool) -> None:
  """Writes config.json; on resume, first says which settings differ from the saved ones."""
  path = os.path.join(workdir, 'config.json')
  if resumed and os.path.exists(path):
    try:
      with open(path) as handle:
        saved = configuration.upgrade_saved_config(json.load(handle))
      changes = configuration.config_changes(saved, config.to_dict())
    except (OSError, ValueError):
      changes = []
    if changes:
      log.warning('resuming with changed settings (config.json is updated): %s',
                  '; '.join(changes))
  run_files.write_json_atomic(path, config.to_dict())
