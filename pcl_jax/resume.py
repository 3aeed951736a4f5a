"""Resuming a run: what a checkpoint must share with the config, and restoring it.

This module owns the checks and repairs made when a run directory is reopened: the remains of
an interrupted save are removed, the latest checkpoint's settings are compared with the config
(before any data or model is built, so a mismatch fails in seconds), the state and the cluster
schedule are restored, and config.json records what changed. Which checkpoint to save and when
is train.py's; the on-disk format is checkpoint.py's.
"""

import json
import logging
import os
import shutil
import sys

from pcl_jax import checkpoint as checkpoint_lib
from pcl_jax import cluster_schedule
from pcl_jax import configuration
from pcl_jax import run_files
from pcl_jax.errors import UserError

log = logging.getLogger(__name__)


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


def check_resumable(config, workdir: str, step: int) -> None:
  """UserError when checkpoint `step` cannot resume under `config`: unreadable meta, another
  network (`models.IDENTITY_FIELDS`), another image size or queue length, or a cluster schedule
  that its saved controller state does not fit. Reads the JSON meta alone (cheap)."""
  path = os.path.join(checkpoint_lib.checkpoint_dir(workdir), str(step))
  try:
    meta = checkpoint_lib.read_meta(workdir, step)
  except Exception as error:  # pylint: disable=broad-except
    raise UserError(
        f'checkpoint {path} is damaged: its meta cannot be read ({type(error).__name__}); '
        'delete that directory to resume from the previous checkpoint, or pass a new '
        '--workdir') from error
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


def _restore_error(workdir: str, step: int, error: Exception) -> UserError:
  """The UserError for a checkpoint that does not restore into this config's state."""
  path = os.path.join(checkpoint_lib.checkpoint_dir(workdir), str(step))
  first_line = str(error).strip().splitlines()[0] if str(error).strip() else ''
  reason = f'{type(error).__name__}: {first_line[:160]}{"..." if len(first_line) > 160 else ""}'
  try:
    checkpoint_lib.restore_for_eval(workdir, step)  # raw: no template to mismatch
  except Exception:  # pylint: disable=broad-except
    return UserError(
        f'checkpoint {path} is damaged and cannot be restored ({reason}); delete that directory '
        'to resume from the previous checkpoint, or pass a new --workdir')
  return UserError(
      f'checkpoint {path} does not fit this config\'s training state ({reason}); resume with the '
      f'settings it was trained with ({os.path.join(workdir, "config.json")}) or pass a new '
      '--workdir')


def _ignore_closed_loop_callbacks() -> None:
  """Drops 'Event loop is closed' errors of I/O callbacks that outlive a failed Orbax restore.

  When a restore fails, Orbax closes its event loop while TensorStore reads are still pending;
  each read that completes later reports an unraisable RuntimeError with a traceback. They
  would bury the one-line error that explains the failure. Other unraisable errors pass.
  """
  previous = sys.unraisablehook
  if getattr(previous, 'ignores_closed_loop', False):
    return

  def hook(unraisable):
    if not (isinstance(unraisable.exc_value, RuntimeError)
            and 'Event loop is closed' in str(unraisable.exc_value)):
      previous(unraisable)

  hook.ignores_closed_loop = True
  sys.unraisablehook = hook


def restore(checkpointer, workdir: str, step: int, initial_state, schedule):
  """(state, epochs_done) of checkpoint `step` (already checked by `check_resumable`), restored
  into the structure of `initial_state`; `schedule` takes its saved controller state."""
  _ignore_closed_loop_callbacks()
  try:
    state, meta = checkpointer.restore(initial_state, step)
  except Exception as error:  # pylint: disable=broad-except
    # The abandoned reads can also report through asyncio's logger when they finish (a full
    # suite under load once printed a TensorStore spec beside the one-line error); that one
    # line, raised below, already says what failed.
    logging.getLogger('asyncio').setLevel(logging.CRITICAL)
    raise _restore_error(workdir, step, error) from error
  schedule.load_state_dict(meta['schedule'])
  return state, int(meta['epochs_done'])


def _config_changes(old: dict, new: dict, prefix: str = '') -> list:
  """'section.field: old -> new' for every leaf that differs between two config dicts."""
  changes = []
  for key in sorted(set(old) | set(new)):
    a, b = old.get(key), new.get(key)
    if isinstance(a, dict) and isinstance(b, dict):
      changes += _config_changes(a, b, f'{prefix}{key}.')
    elif a != b:
      changes.append(f'{prefix}{key}: {a!r} -> {b!r}')
  return changes


def write_config(workdir: str, config, resumed: bool) -> None:
  """Writes config.json; on resume, first says which settings differ from the saved ones."""
  path = os.path.join(workdir, 'config.json')
  if resumed and os.path.exists(path):
    try:
      with open(path) as handle:
        saved = configuration.upgrade_saved_config(json.load(handle))
      changes = _config_changes(saved, config.to_dict())
    except (OSError, ValueError):
      changes = []
    if changes:
      log.warning('resuming with changed settings (config.json is updated): %s',
                  '; '.join(changes))
  run_files.write_json_atomic(path, config.to_dict())
