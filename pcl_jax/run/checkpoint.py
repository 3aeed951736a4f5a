"""Orbax checkpoints of a run: save every few epochs, resume the latest, restore for evaluation.

This module owns the on-disk layout `WORKDIR/checkpoints/<epochs_done>/{state,meta}`: `state` is
the PCLState pytree (StandardSave), `meta` a JSON dict of host-side state (the cluster-schedule
controller, the config's model fields). The checkpoint step is the number of completed epochs.
It never decides *when* to save (train.py does) and never unpickles anything.

Integrity: once a checkpoint is committed, `seal` writes `checksums.json` beside its items (the
size and SHA-256 of every file), and `damage` checks a checkpoint against it before it is
restored, so a truncated, altered or missing file is found and named, whatever Orbax or
TensorStore would make of it. A checkpoint without the file (written by an older version, or the
newest one of a run killed before sealing it) can only be judged by restoring it.

The state is a plain Flax tree: parameters as flax.linen's layers name and shape them (HWIO conv
kernels). A checkpoint written in an older format is brought to today's on restore by the steps
of `UPGRADES`, each recognised from the checkpoint's `meta` (as `configuration.upgrade_saved_config`
translates a saved config.json), so those runs still resume and evaluate; checkpoints are always
written in today's format.
"""

import dataclasses
import functools
import json
import logging
import os
import re
import sys
from typing import Any, Callable, Optional, Tuple

import jax
from etils import epath
import numpy as np
import orbax.checkpoint as ocp

from pcl_jax.configuration import UserError
from pcl_jax import models
from pcl_jax.run import files as run_files

CHECKSUMS_FILE = 'checksums.json'


def _is_conv_kernel(path, leaf) -> bool:
  """A 4-D leaf named 'kernel': a conv kernel of the params, key params or their optimizer
  state (optax's momentum mirrors the parameter tree)."""
  last = path[-1] if path else None
  name = getattr(last, 'key', getattr(last, 'name', None))
  return name == 'kernel' and len(np.shape(leaf)) == 4


def _permute_conv_kernels(tree, permutation: Tuple[int, ...]):
  """`tree` with the axes of every conv kernel permuted. Leaves may be arrays (kept on their
  sharding), numpy arrays or ShapeDtypeStructs (restore templates)."""

  def move(path, leaf):
    if not _is_conv_kernel(path, leaf):
      return leaf
    if isinstance(leaf, jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct(tuple(leaf.shape[i] for i in permutation), leaf.dtype,
                                  sharding=leaf.sharding)
    if isinstance(leaf, jax.Array):
      return jax.device_put(leaf.transpose(permutation), leaf.sharding)
    return np.transpose(leaf, permutation)

  return jax.tree_util.tree_map_with_path(move, tree)


@dataclasses.dataclass(frozen=True)
class Upgrade:
  """One change of the checkpoint format, undone when an older checkpoint is restored.

  Attributes:
    name: what changed.
    applies: (saved meta) -> whether the checkpoint predates the change.
    to_saved: a state tree (or restore template) in today's form -> the old form's, for the
      template a restore of the old checkpoint needs.
    to_current: a state tree restored in the old form -> today's.
    retired_meta: meta keys of the old format, dropped from the restored meta.
  """
  name: str
  applies: Callable[[dict], bool]
  to_saved: Callable[[Any], Any]
  to_current: Callable[[Any], Any]
  retired_meta: Tuple[str, ...] = ()


# Oldest first. Checkpoints of the same format as today's (among them the HWIO ones written before
# conv kernels were ever stored otherwise) need none.
UPGRADES = (
    # Conv kernels were stored [out, kh, kw, in] for a while, said by meta['conv_kernel_layout'].
    Upgrade("conv kernels OHWI -> HWIO (flax's layout)",
            applies=lambda meta: meta.get('conv_kernel_layout') == 'OHWI',
            to_saved=functools.partial(_permute_conv_kernels, permutation=(3, 0, 1, 2)),
            to_current=functools.partial(_permute_conv_kernels, permutation=(1, 2, 3, 0)),
            retired_meta=('conv_kernel_layout',)),
)


def upgrades_for(meta: dict) -> Tuple[Upgrade, ...]:
  """The steps of `UPGRADES` that a checkpoint with this saved `meta` needs, oldest first."""
  return tuple(upgrade for upgrade in UPGRADES if upgrade.applies(meta))


def _saved_form(tree, upgrades):
  """Today's `tree` in the form of a checkpoint that needs `upgrades`."""
  for upgrade in reversed(upgrades):
    tree = upgrade.to_saved(tree)
  return tree


def _upgraded(tree, meta: dict, upgrades) -> Tuple[Any, dict]:
  """(tree, meta) of a checkpoint that needs `upgrades`, in today's format."""
  for upgrade in upgrades:
    tree = upgrade.to_current(tree)
    meta = {key: value for key, value in meta.items() if key not in upgrade.retired_meta}
  return tree, meta


def _as_template(tree):
  """ShapeDtypeStructs (with shardings) of a state: what StandardRestore needs, nothing read."""
  return jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, 'sharding', None)),
      tree)


def _fields_added_since(state_directory, template_state) -> Tuple[str, ...]:
  """The state fields of `template_state` (a PCLState) that a checkpoint saved before they
  existed lacks, e.g. `queue_index`; they restore at their initial values (a queue row of
  unknown sample is never masked)."""
  saved = ocp.StandardCheckpointHandler().metadata(epath.Path(state_directory))
  saved_fields = set(getattr(saved, 'tree', saved).keys())
  return tuple(name for name in vars(template_state) if name not in saved_fields)


def checkpoint_dir(workdir: str, best: bool = False) -> str:
  """WORKDIR/checkpoints, or WORKDIR/checkpoints_best (the best-by-validation one)."""
  return os.path.join(os.path.abspath(workdir), 'checkpoints_best' if best else 'checkpoints')


def saved_steps(directory: str):
  """The committed checkpoints (epochs done) in a checkpoint directory, listed without Orbax:
  Orbax names each `<step>` and commits it by renaming its temporary directory to that name."""
  return sorted(int(name) for name in os.listdir(directory)
                if name.isdigit() and os.path.isdir(os.path.join(directory, name)))


def step_dir(workdir: str, epochs_done: int, best: bool = False) -> str:
  """The directory of checkpoint `epochs_done`."""
  return os.path.join(checkpoint_dir(workdir, best), str(epochs_done))


def _files(directory: str):
  """Every file below `directory` but the checksums (and a temporary one of a sealing cut
  short, `run_files.write_atomic`'s), as sorted relative paths."""
  found = []
  for root, _, names in os.walk(directory):
    found += [os.path.relpath(os.path.join(root, name), directory) for name in names]
  return sorted(name for name in found
                if name != CHECKSUMS_FILE and not os.path.basename(name).startswith('.tmp_'))


def seal(directory: str) -> None:
  """Writes `directory`/checksums.json for a committed checkpoint, once (atomically)."""
  path = os.path.join(directory, CHECKSUMS_FILE)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f'no checkpoint at {directory}')
  if os.path.exists(path):
    return
  files = {name: list(run_files.file_digest(os.path.join(directory, name)))
           for name in _files(directory)}
  run_files.write_json_atomic(path, {'algorithm': 'sha256', 'files': files})


def damage(directory: str) -> Optional[str]:
  """Why the checkpoint in `directory` cannot be trusted, naming the file; None when it matches
  its checksums.json, or has none (then only a restore can tell)."""
  path = os.path.join(directory, CHECKSUMS_FILE)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as handle:
      recorded = json.load(handle)['files']
    recorded = {name: (int(size), str(digest)) for name, (size, digest) in recorded.items()}
  except (OSError, ValueError, KeyError, TypeError, AttributeError):
    return f'{CHECKSUMS_FILE} is unreadable'
  for name, (size, digest) in sorted(recorded.items()):
    file_path = os.path.join(directory, name)
    if not os.path.isfile(file_path):
      return f'{name} is missing'
    actual_size, actual_digest = run_files.file_digest(file_path)
    if actual_size != size:
      return f'{name} has {actual_size} of its {size} bytes'
    if actual_digest != digest:
      return f'{name} has changed since it was written (checksum)'
  return None


def read_meta(workdir: str, epochs_done: int, best: bool = False) -> dict:
  """The JSON `meta` item of checkpoint `epochs_done`, read alone (cheap: no arrays, no model)."""
  path = os.path.join(step_dir(workdir, epochs_done, best), 'meta')
  return ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(path)


def check_model_matches(config, meta: dict, path: str) -> None:
  """UserError naming the first `model.*` field (`models.IDENTITY_FIELDS`) where the config and
  checkpoint `path` (with this `meta`) differ. Other saved fields are not identity: older
  checkpoints also hold kernel and thread choices under `model`, which any value may change."""
  saved = meta.get('model') or {}
  for field in models.IDENTITY_FIELDS:
    if field in saved and saved[field] != config.model[field]:
      raise UserError(
          f'the config\'s model.{field}={config.model[field]!r} does not match checkpoint {path}, '
          f'trained with model.{field}={saved[field]!r}; pass --config.model.{field}='
          f'{saved[field]} (the run\'s config.json has every setting) or a new --workdir')


def _composite_save(state, meta):
  return ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))


class Checkpointer:
  """Thin wrapper over ocp.CheckpointManager with the project's two items."""

  def __init__(self, workdir: str, max_to_keep: int = 3):
    self.manager = ocp.CheckpointManager(
        checkpoint_dir(workdir),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        item_names=('state', 'meta'))
    self.workdir = workdir
    self.best_manager = None  # opened on the first validation, so runs without one have no dir
    self._unsealed = {}  # id(manager) -> steps saved by this run and not yet sealed

  def _best(self) -> ocp.CheckpointManager:
    """The over-fitting monitor's pick: one checkpoint, the best validation kNN top-1 so far."""
    if self.best_manager is None:
      self.best_manager = ocp.CheckpointManager(
          checkpoint_dir(self.workdir, best=True),
          options=ocp.CheckpointManagerOptions(
              max_to_keep=1, best_fn=lambda metrics: metrics['val_knn_top1'], best_mode='max',
              create=True),
          item_names=('state', 'meta'))
    return self.best_manager

  def _open_managers(self):
    return [m for m in (self.manager, self.best_manager) if m is not None]

  def latest_epoch(self) -> Optional[int]:
    return self.manager.latest_step()

  def reload(self) -> None:
    """Rereads the checkpoint directory (after a checkpoint was moved away)."""
    self.manager.reload()

  def _seal_committed(self, manager: ocp.CheckpointManager) -> None:
    """Waits for `manager`'s pending save, then seals the checkpoints this run saved with it
    (process 0 only: the others share its files). Checkpoints it did not write are left as they
    are: their bytes are not vouched for."""
    manager.wait_until_finished()
    saved = self._unsealed.pop(id(manager), [])
    if jax.process_index() != 0:
      return
    kept = set(manager.all_steps())  # a saved step may be gone again (max_to_keep, best_fn)
    for step in (step for step in saved if step in kept):
      try:
        seal(os.path.join(str(manager.directory), str(step)))
      except FileNotFoundError:  # not kept (max_to_keep, or the best one replaced)
        continue

  def _save(self, manager: ocp.CheckpointManager, epochs_done: int, state, meta: dict,
            **metrics) -> None:
    self._seal_committed(manager)
    manager.save(epochs_done, args=_composite_save(state, meta), **metrics)
    self._unsealed.setdefault(id(manager), []).append(epochs_done)

  def save(self, epochs_done: int, state, meta: dict) -> None:
    self._save(self.manager, epochs_done, state, meta)

  def save_if_best(self, epochs_done: int, state, meta: dict, val_knn_top1: float) -> None:
    """Offers the state to the best-by-validation manager (it keeps the single best)."""
    self._save(self._best(), epochs_done, state, meta,
               metrics={'val_knn_top1': float(val_knn_top1)})

  def restore(self, template_state, epochs_done: Optional[int] = None) -> Tuple[Any, dict]:
    """Restores (state, meta) into the structure, shapes and dtypes of `template_state`."""
    _quiet_failed_reads()
    step = self.manager.latest_step() if epochs_done is None else epochs_done
    meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
    upgrades = upgrades_for(meta)
    template = _saved_form(_as_template(template_state), upgrades)
    added = _fields_added_since(os.path.join(str(self.manager.directory), str(step), 'state'),
                                template_state)
    if added:  # restore what was saved, then give the newer fields their initial values
      template = {name: value for name, value in vars(template).items() if name not in added}
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(template)))
    state, meta = _upgraded(restored['state'], meta, upgrades)
    if added:
      state = template_state.replace(**state, **{name: getattr(template_state, name)
                                                 for name in added})
    return state, meta

  def wait(self) -> None:
    """Waits for pending saves and seals them."""
    for manager in self._open_managers():
      self._seal_committed(manager)

  def close(self) -> None:
    for manager in self._open_managers():
      self._seal_committed(manager)
      manager.close()


def _quiet_failed_reads() -> None:
  """Drops 'Event loop is closed' errors of I/O callbacks that outlive a failed Orbax restore.

  When a restore fails, Orbax closes its event loop while TensorStore reads are still pending;
  each read that completes later reports an unraisable RuntimeError with a traceback. They
  would bury the one-line error that explains the failure. Other unraisable errors pass. The
  abandoned reads can also report through asyncio's logger when they finish (a full suite under
  load once printed a TensorStore spec beside the one-line error): that logger is silenced too.
  """
  logging.getLogger('asyncio').setLevel(logging.CRITICAL)
  previous = sys.unraisablehook
  if getattr(previous, 'ignores_closed_loop', False):
    return

  def hook(unraisable):
    if not (isinstance(unraisable.exc_value, RuntimeError)
            and 'Event loop is closed' in str(unraisable.exc_value)):
      previous(unraisable)

  hook.ignores_closed_loop = True
  sys.unraisablehook = hook


def _raw_restore(directory: str, step: int) -> Tuple[dict, dict]:
  """(state tree, meta) of checkpoint `step` in `directory`, restored as saved (no template)
  and brought to today's format (`UPGRADES`)."""
  _quiet_failed_reads()
  manager = ocp.CheckpointManager(directory, item_names=('state', 'meta'))
  try:
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
  finally:
    manager.close()
  return _upgraded(restored['state'], restored['meta'], upgrades_for(restored['meta']))


class _Damaged(Exception):
  """A checkpoint that fails its checksums or does not restore as saved; the message says why,
  naming the file where it can."""


def _restore_intact(workdir: str, epochs_done: int, best: bool) -> Tuple[dict, dict]:
  """`_raw_restore` of checkpoint `epochs_done` after its checksums; _Damaged when either
  fails."""
  directory = step_dir(workdir, epochs_done, best)
  problem = damage(directory)
  if problem:
    raise _Damaged(problem)
  try:
    return _raw_restore(checkpoint_dir(workdir, best), epochs_done)
  except Exception as error:  # pylint: disable=broad-except
    raise _Damaged(failed_file(error, directory)) from error


def readable(workdir: str, epochs_done: int, best: bool = False) -> Optional[str]:
  """None when checkpoint `epochs_done` is intact and restores as saved; else why not, naming
  the file where it can (for telling a damaged checkpoint from one that fits another config)."""
  try:
    _restore_intact(workdir, epochs_done, best)
  except _Damaged as damaged:
    return str(damaged)
  return None


def failed_file(error: BaseException, directory: str) -> str:
  """What a failed read of the checkpoint in `directory` says, with the file it names (Orbax and
  TensorStore put the path in their messages) relative to `directory`."""
  text = str(error)
  match = re.search(re.escape(os.path.abspath(directory)) + r'/([^\s"\'\],:]+)', text)
  first_line = text.strip().splitlines()[0] if text.strip() else type(error).__name__
  first_line = first_line[:160] + ('...' if len(first_line) > 160 else '')
  if match:
    return f'{match.group(1)} cannot be read ({type(error).__name__}: {first_line})'
  return f'its files cannot be read ({type(error).__name__}: {first_line})'


def restore_for_eval(workdir: str, epochs_done: Optional[int] = None,
                     best: bool = False) -> Tuple[dict, dict, int]:
  """Restores the raw saved tree (no optimizer, no template) for evaluation.

  Args:
    workdir: the run directory.
    epochs_done: which checkpoint; default the latest.
    best: read the best-by-validation checkpoint (WORKDIR/checkpoints_best) instead.

  Returns:
    (state_tree, meta, epochs_done): `state_tree` is a nested dict with the PCLState field names
    (`key_params`, `key_batch_stats`, ...).
  Raises:
    FileNotFoundError: no checkpoint under WORKDIR/checkpoints (or not the requested one).
    UserError: the checkpoint is damaged or cannot be read (names the file and the other
      checkpoints `--step` can pick).
  """
  directory = checkpoint_dir(workdir, best)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f'no checkpoint in {directory}; train first with the same --workdir')
  steps = saved_steps(directory)
  step = max(steps) if (epochs_done is None and steps) else epochs_done
  if step is None or step not in steps:
    raise FileNotFoundError(f'no checkpoint {"" if step is None else step} in {directory} '
                            f'(available: {sorted(steps)}); train first or pass an existing --step')
  path = step_dir(workdir, step, best)
  others = sorted(set(steps) - {step})
  another = (f'evaluate another with --step=N (available: {others})' if others else
             'retrain, or restore the checkpoint from a copy')
  try:
    state, meta = _restore_intact(workdir, step, best)
  except _Damaged as damaged:
    raise UserError(f'checkpoint {path} is damaged: {damaged}; {another}') from damaged
  return state, meta, step
