"""Orbax checkpoints of a run: save every few epochs, resume the latest, restore for evaluation.

This module owns the on-disk layout `WORKDIR/checkpoints/<epochs_done>/{state,meta}`: `state` is
the PCLState pytree (StandardSave), `meta` a JSON dict of host-side state (the cluster-schedule
controller, the config's model fields). The checkpoint step is the number of completed epochs.
It never decides *when* to save (train.py does) and never unpickles anything.

Conv kernels are saved in `models.CONV_KERNEL_LAYOUT` (OHWI), recorded in `meta` under
'conv_kernel_layout'. Checkpoints written before that key existed hold flax's HWIO kernels; both
restores transpose them, so those runs still resume and evaluate.
"""

import os
from typing import Any, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from pcl_jax import models
from pcl_jax.errors import UserError

KERNEL_LAYOUT_KEY = 'conv_kernel_layout'
_LAYOUT_BEFORE_THE_KEY = 'HWIO'


def saved_kernel_layout(meta: dict) -> str:
  """The layout of the conv kernels in a checkpoint with this `meta`."""
  return meta.get(KERNEL_LAYOUT_KEY, _LAYOUT_BEFORE_THE_KEY)


def _is_conv_kernel(path, leaf) -> bool:
  """A 4-D leaf named 'kernel': a conv kernel of the params, key params or their optimizer
  state (optax's momentum mirrors the parameter tree)."""
  last = path[-1] if path else None
  name = getattr(last, 'key', getattr(last, 'name', None))
  return name == 'kernel' and len(np.shape(leaf)) == 4


def transpose_conv_kernels(tree, source: str, target: str):
  """`tree` with every conv kernel moved from layout `source` to `target` ('HWIO'/'OHWI').

  Leaves may be arrays (kept on their sharding) or ShapeDtypeStructs (restore templates)."""
  if source == target:
    return tree
  permutation = tuple(source.index(axis) for axis in target)

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


def _as_template(tree):
  """ShapeDtypeStructs (with shardings) of a state: what StandardRestore needs, nothing read."""
  return jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, 'sharding', None)),
      tree)


def checkpoint_dir(workdir: str, best: bool = False) -> str:
  """WORKDIR/checkpoints, or WORKDIR/checkpoints_best (the best-by-validation one)."""
  return os.path.join(os.path.abspath(workdir), 'checkpoints_best' if best else 'checkpoints')


def read_meta(workdir: str, epochs_done: int, best: bool = False) -> dict:
  """The JSON `meta` item of checkpoint `epochs_done`, read alone (cheap: no arrays, no model)."""
  path = os.path.join(checkpoint_dir(workdir, best), str(epochs_done), 'meta')
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
  meta = {**meta, KERNEL_LAYOUT_KEY: models.CONV_KERNEL_LAYOUT}
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

  def save(self, epochs_done: int, state, meta: dict) -> None:
    self.manager.save(epochs_done, args=_composite_save(state, meta))

  def save_if_best(self, epochs_done: int, state, meta: dict, val_knn_top1: float) -> None:
    """Offers the state to the best-by-validation manager (it keeps the single best)."""
    self._best().save(epochs_done, args=_composite_save(state, meta),
                      metrics={'val_knn_top1': float(val_knn_top1)})

  def restore(self, template_state, epochs_done: Optional[int] = None) -> Tuple[Any, dict]:
    """Restores (state, meta) into the structure, shapes and dtypes of `template_state`."""
    step = self.manager.latest_step() if epochs_done is None else epochs_done
    meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
    layout = saved_kernel_layout(meta)
    template = transpose_conv_kernels(_as_template(template_state), models.CONV_KERNEL_LAYOUT,
                                      layout)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(template)))
    state = transpose_conv_kernels(restored['state'], layout, models.CONV_KERNEL_LAYOUT)
    return state, meta

  def wait(self) -> None:
    for manager in self._open_managers():
      manager.wait_until_finished()

  def close(self) -> None:
    for manager in self._open_managers():
      manager.wait_until_finished()
      manager.close()


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
  """
  directory = checkpoint_dir(workdir, best)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f'no checkpoint in {directory}; train first with the same --workdir')
  manager = ocp.CheckpointManager(directory, item_names=('state', 'meta'))
  steps = manager.all_steps()
  step = max(steps) if (epochs_done is None and steps) else epochs_done
  if step is None or step not in steps:
    raise FileNotFoundError(f'no checkpoint {"" if step is None else step} in {directory} '
                            f'(available: {sorted(steps)}); train first or pass an existing --step')
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
  manager.close()
  state = transpose_conv_kernels(restored['state'], saved_kernel_layout(restored['meta']),
                                 models.CONV_KERNEL_LAYOUT)
  return state, restored['meta'], step
