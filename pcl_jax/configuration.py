"""Start-up checks of a config: every user mistake becomes one clear `UserError` before training.

This module owns validation only (no defaults: those live in configs/default.py). Each message
names the setting and the fix, so `main.py` can print it as one line and exit with status 2.
"""

from pcl_jax import models

DTYPES = ('float32', 'bfloat16')
BACKENDS = ('auto', 'faiss', 'jax')
DATASETS = ('digits', 'fake', 'image_folder', 'mini_imagenet')
SCHEDULE_MODES = ('plateau', 'fixed')
FEATURE_LAYERS = ('head', 'backbone')


class UserError(ValueError):
  """A mistake the user can fix by changing a setting; printed without a traceback."""


def _require(condition: bool, message: str) -> None:
  if not condition:
    raise UserError(message)


def _one_of(value, choices, setting: str) -> None:
  _require(value in choices, f'{setting}={value!r} is unknown; use one of {", ".join(choices)}')


def parse_int_list(text: str, setting: str) -> list:
  """'120,160' -> [120, 160]; '' -> []."""
  try:
    return [int(part) for part in str(text).split(',') if part.strip()]
  except ValueError as error:
    raise UserError(f'{setting}={text!r} is not a comma-separated list of integers') from error


def validate(config) -> None:
  """Checks every field that can be checked without loading data. Raises UserError."""
  _one_of(config.data.name, DATASETS, 'data.name')
  _one_of(config.model.arch, models.ARCHS, 'model.arch')
  _one_of(config.train.dtype, DTYPES, 'train.dtype')
  _one_of(config.clustering.backend, BACKENDS, 'clustering.backend')
  _one_of(config.schedule.mode, SCHEDULE_MODES, 'schedule.mode')
  _one_of(config.eval.feature_layer, FEATURE_LAYERS, 'eval.feature_layer')
  _one_of(config.optim.schedule_per, ('epoch', 'step'), 'optim.schedule_per')
  batch, groups = config.train.batch_size, config.train.shuffle_bn_groups
  _require(batch >= 2, f'train.batch_size={batch} must be at least 2')
  _require(groups >= 1 and batch % groups == 0,
           f'train.batch_size={batch} is not a multiple of train.shuffle_bn_groups={groups}; '
           'change one of them')
  if groups > 1:
    _require(batch // groups >= 2, f'train.shuffle_bn_groups={groups} leaves fewer than 2 '
             f'samples per BN group at train.batch_size={batch}; use fewer groups')
  r = config.pcl.num_negatives
  _require(r >= batch and r % batch == 0,
           f'pcl.num_negatives={r} must be a positive multiple of train.batch_size={batch} '
           f'(the queue is filled one batch at a time); e.g. {max(1, r // batch) * batch}')
  _require(config.train.epochs >= 0, f'train.epochs={config.train.epochs} must be >= 0')
  _require(config.train.steps_per_epoch >= 0,
           f'train.steps_per_epoch={config.train.steps_per_epoch} must be >= 0 (0: full epoch)')
  _require(config.train.log_every_steps >= 1,
           f'train.log_every_steps={config.train.log_every_steps} must be >= 1')
  _require(config.optim.lr > 0, f'optim.lr={config.optim.lr} must be positive')
  _require(0 <= config.optim.momentum < 1, f'optim.momentum={config.optim.momentum} must be in [0, 1)')
  _require(config.optim.weight_decay >= 0,
           f'optim.weight_decay={config.optim.weight_decay} must be >= 0')
  parse_int_list(config.optim.schedule, 'optim.schedule')
  _require(config.pcl.temperature > 0, f'pcl.temperature={config.pcl.temperature} must be > 0')
  _require(0 <= config.pcl.moco_m <= 1, f'pcl.moco_m={config.pcl.moco_m} must be in [0, 1]')
  _require(config.pcl.warmup_epochs >= 0,
           f'pcl.warmup_epochs={config.pcl.warmup_epochs} must be >= 0')
  _require(0 <= config.pcl.smoothing_cap < 1,
           f'pcl.smoothing_cap={config.pcl.smoothing_cap} must be in [0, 1)')
  _require(config.pcl.max_clusters >= 0,
           f'pcl.max_clusters={config.pcl.max_clusters} must be >= 0 (0: largest listed k)')
  _require(config.clustering.niter >= 1, f'clustering.niter={config.clustering.niter} must be >= 1')
  _require(config.clustering.nredo >= 1, f'clustering.nredo={config.clustering.nredo} must be >= 1')
  _require(config.data.image_size >= 8, f'data.image_size={config.data.image_size} must be >= 8')
  _require(config.data.num_workers >= 0,
           f'data.num_workers={config.data.num_workers} must be >= 0')
  _require(config.data.cache_size >= 0,
           f'data.cache_size={config.data.cache_size} must be >= 0 (0: automatic)')
  _require(config.eval.val_every >= 0,
           f'eval.val_every={config.eval.val_every} must be >= 0 (0: no validation kNN)')
  _require(config.eval.knn_k >= 1, f'eval.knn_k={config.eval.knn_k} must be >= 1')
  _require(config.model.dim >= 1, f'model.dim={config.model.dim} must be >= 1')
  _require(config.checkpoint.every_epochs >= 1,
           f'checkpoint.every_epochs={config.checkpoint.every_epochs} must be >= 1')
  _require(config.checkpoint.max_to_keep >= 1,
           f'checkpoint.max_to_keep={config.checkpoint.max_to_keep} must be >= 1')
  if config.data.name in ('image_folder', 'mini_imagenet'):
    _require(bool(config.data.root), f'data.name={config.data.name} needs data.root=DIR '
             '(see README "Data layout")')


def validate_against_data(config, num_train: int) -> None:
  """Checks that need the training-set size N."""
  batch = config.train.batch_size
  _require(num_train >= batch,
           f'train.batch_size={batch} is larger than the {num_train} training images of '
           f'data.train_split={config.data.train_split!r}; use a smaller batch')
