"""The settings' contract: the values each may take, `UserError`, and the start-up checks.

This module owns validation only (no defaults: those live in configs/default.py, which is also
the reference for which fields exist and their types): every user mistake becomes one clear
`UserError` before training, its message naming the setting and the fix, so `main.py` can print
it as one line and exit with status 2. Importing it costs nothing: no JAX, flax or torch.
"""

import copy
import difflib
from typing import List

import ml_collections

from pcl_jax import cluster_schedule


class UserError(ValueError):
  """A mistake the user can fix by changing a setting; `main` prints it as one `error:` line
  (no traceback) and exits with status 2. The message names the setting and the fix."""


# The values each setting may take. The modules that implement each choice (models, kernels,
# clustering, data) read them from here, so validation imports neither torch nor flax (a bad
# value fails in about a second) and no implementation has to import the validator's checks.
ARCHS = ('conv4', 'resnet18', 'resnet34', 'resnet50')
CONV_IMPLS = ('auto', 'xla', 'torch', 'onednn')
DTYPES = ('float32', 'bfloat16')
# 'faiss-cpu' / 'faiss-gpu' force a faiss build (clustering.resolve_backend); checked at start-up.
BACKENDS = ('auto', 'faiss', 'jax', 'faiss-cpu', 'faiss-gpu')
DATASETS = ('digits', 'fake', 'image_folder', 'mini_imagenet')
SCHEDULE_MODES = ('plateau', 'fixed')
FEATURE_LAYERS = ('head', 'backbone')
# data.eval_resize: 'whole' (resize to the crop: all of a square image), 'center' (resize to 8/7
# of the crop, then the center crop: ImageNet's), 'auto' (pcl_jax/data/recipes.resolve_eval_resize).
EVAL_RESIZES = ('auto', 'whole', 'center')
# eval.encoder: the momentum (key) encoder, as the reference's feature pass, or the query encoder,
# as salesforce/PCL's eval_svm_voc.py / eval_cls_imagenet.py.
EVAL_ENCODERS = ('key', 'query')
INSTANCE_LOSSES = ('infonce', 'masked', 'attract', 'debiased', 'selected')  # pcl.instance_loss
MASK_LEVELS = ('finest', 'coarsest')  # pcl.masked.level
ATTRACT_LEVELS = ('finest', 'coarsest', 'graded')  # pcl.attract.level
PROTO_COLUMNS = ('unique', 'reference')  # pcl.proto_columns
CLUSTER_LEVELS = ('flat', 'hierarchical', 'balanced')  # clustering.levels
PAD_K = ('auto', 'max', 'exact')  # clustering.pad_k
# Per-epoch metrics the plateau detector can monitor (schedule.metric).
SCHEDULE_METRICS = ('acc_inst', 'loss_inst', 'loss', 'acc_proto', 'loss_proto', 'val_knn_top1')


# Settings read under one value of a choice only: choice -> {value: the fields or sections it
# reads}. Under any other value they must keep configs/default.py's values (`_check_unread`), so
# a setting that cannot matter is never silently ignored.
READ_ONLY_WITH = {
    'pcl.instance_loss': {form: (f'pcl.{form}',) for form in INSTANCE_LOSSES},
    'clustering.levels': {'balanced': ('clustering.sinkhorn_epsilon',
                                       'clustering.sinkhorn_iterations')},
    'eval.cluster_head': {True: ('eval.cluster_head_k',)},
}

# Settings that moved between sections: old dotted name -> new one. A run directory written with
# the old name (config.json, checkpoint meta) is read as if it had the new one.
RELOCATED_FIELDS = {'model.conv_impl': 'runtime.conv_impl',
                    'model.xla_cpu_threads': 'runtime.xla_cpu_threads'}
# Switches that one choice replaced: old dotted name -> the setting that says it now. A saved
# config.json with them is translated (`_translate_switches`), so its runs resume and compare.
REPLACED_SWITCHES = {
    'pcl.mask_same_cluster_negatives': "pcl.instance_loss='masked'",
    'pcl.attract_same_cluster': "pcl.instance_loss='attract'",
    'pcl.mask_level': 'pcl.masked.level or pcl.attract.level',
    'pcl.attract_share': "pcl.attract.share, read with pcl.instance_loss='attract'",
    'pcl.smooth_instance': 'pcl.infonce.smoothed, or the smoothed field of pcl.masked, '
                           'pcl.attract or pcl.selected',
    'pcl.debias_prior': "pcl.instance_loss='debiased' with pcl.debiased.prior",
    'pcl.select_negatives': "pcl.instance_loss='selected'",
    'clustering.hierarchical': "clustering.levels='hierarchical'",
    'clustering.balanced': "clustering.levels='balanced'",
}
# Every old name -> where it went. A config file, command line or study file that still names
# one is told ('it is now ...').
MOVED_FIELDS = {**RELOCATED_FIELDS, **REPLACED_SWITCHES}


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


def _reference_config():
  """configs/default.py's config (every field, with its type), or None if not importable."""
  try:
    from configs import default  # pylint: disable=g-import-not-at-top
  except ImportError:  # pcl_jax used outside the repository: skip the field check
    return None
  return default.get_config()


def _is_section(value) -> bool:
  return isinstance(value, ml_collections.ConfigDict)


def _compatible(value, expected) -> bool:
  """Whether `value` may stand where configs/default.py has `expected` (ints pass as floats)."""
  if isinstance(expected, bool):
    return isinstance(value, bool)
  if isinstance(expected, int):
    return isinstance(value, int) and not isinstance(value, bool)
  if isinstance(expected, float):
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if isinstance(expected, str):
    return isinstance(value, str)
  return True


def _check_section(section, reference, prefix: str) -> None:
  for name in reference.keys():
    setting = prefix + name
    if name not in section:
      raise UserError(f'the config has no field {setting}; build configs on configs/default.py '
                      '(import it and override fields) so that every field exists')
    expected, value = reference[name], section[name]
    if _is_section(expected):
      _require(_is_section(value), f'{setting} must be a config section (ConfigDict), got '
               f'{value!r}; see configs/default.py')
      _check_section(value, expected, setting + '.')
    elif not _compatible(value, expected):
      raise UserError(f'{setting}={value!r} is a {type(value).__name__}, expected a '
                      f'{type(expected).__name__} such as {expected!r}')
  for name in section.keys():
    if name not in reference:
      close = difflib.get_close_matches(name, list(reference.keys()), n=1)
      hint = f'; did you mean {prefix}{close[0]}?' if close else ''
      if prefix + name in MOVED_FIELDS:
        hint = f'; it is now {MOVED_FIELDS[prefix + name]}'
      raise UserError(f'the config has an unknown field {prefix}{name}{hint} (configs/default.py '
                      'lists every field)')


def check_fields(config, reference=None) -> None:
  """Raises UserError unless `config` has exactly configs/default.py's fields, with their types.

  Command-line overrides are type-checked by ml_collections already; this catches config
  *files* with a typo'd, missing or wrongly typed field, which would otherwise be ignored or
  fail deep inside training.
  """
  reference = _reference_config() if reference is None else reference
  if reference is not None:
    _require(_is_section(config), f'the config must be a ConfigDict, got {type(config).__name__}; '
             'get_config() must return one (see configs/digits.py)')
    _check_section(config, reference, '')


def _checked_schedule(config):
  """The cluster-count schedule the settings describe (list order, duplicates, levels, mode,
  metric), as a fresh controller."""
  try:
    schedule = cluster_schedule.ClusterSchedule.from_config(
        config.schedule, hierarchical=config.clustering.levels == 'hierarchical')
  except ValueError as error:  # its messages name the setting and the fix
    raise UserError(str(error)) from error
  if config.schedule.mode == 'plateau':
    _one_of(config.schedule.metric, SCHEDULE_METRICS, 'schedule.metric')
    if config.schedule.metric == 'val_knn_top1':
      _require(config.eval.val_every == 1,
               f'schedule.metric=val_knn_top1 is read every epoch but eval.val_every='
               f'{config.eval.val_every}; set --config.eval.val_every=1 or monitor acc_inst')
  return schedule


def _leaves(value, setting: str) -> dict:
  """{dotted name: value} of a field, or of every field of a section."""
  if not _is_section(value):
    return {setting: value}
  return {name: leaf for key in value.keys()
          for name, leaf in _leaves(value[key], f'{setting}.{key}').items()}


def _setting(config, setting: str):
  for part in setting.split('.'):
    config = config[part]
  return config


def _check_unread(config, reference) -> None:
  """The settings that `READ_ONLY_WITH` says the chosen values do not read are at their
  defaults: e.g. pcl.attract.share under pcl.instance_loss='masked' would change nothing."""
  for choice, read_by in READ_ONLY_WITH.items():
    chosen = _setting(config, choice)
    for value, settings in read_by.items():
      if value == chosen:
        continue
      for setting in settings:
        defaults = _leaves(_setting(reference, setting), setting)
        for name, got in _leaves(_setting(config, setting), setting).items():
          _require(got == defaults[name],
                   f'{name}={got!r} is read only with {choice}={value!r}, and {choice} is '
                   f'{chosen!r}; set {choice}={value!r}, or leave {name} at its default '
                   f'{defaults[name]!r}')


def _check_loss(pcl) -> None:
  """InfoNCE's form and its parameters (`losses.INSTANCE_FORMS`), ProtoNCE's weight and
  columns."""
  _require(pcl.masked.level in MASK_LEVELS,
           f'pcl.masked.level={pcl.masked.level!r} is unknown; use one of '
           f'{", ".join(MASK_LEVELS)} (a key is masked or not: graded weights are '
           "pcl.attract.level's)")
  _one_of(pcl.attract.level, ATTRACT_LEVELS, 'pcl.attract.level')
  _require(0 <= pcl.attract.share < 1,
           f'pcl.attract.share={pcl.attract.share} must be in [0, 1) (the attracted keys\' '
           'share of InfoNCE\'s target; 0: uniform over the positives)')
  _require(0 < pcl.debiased.prior < 1, f'pcl.debiased.prior={pcl.debiased.prior} must be in '
           '(0, 1) (about 1 / number of classes)')
  _one_of(pcl.proto_columns, PROTO_COLUMNS, 'pcl.proto_columns')
  _require(pcl.proto_weight >= 0, f'pcl.proto_weight={pcl.proto_weight} must be >= 0 '
           '(0: InfoNCE only)')


def validate(config) -> cluster_schedule.ClusterSchedule:
  """Checks every field that can be checked without loading data or asking the machine.

  The run's one trip through its settings: the entry point calls this once and hands on what it
  built, the cluster-count controller. What depends on the machine (the k-means backend, the
  kernels) is checked where it is chosen (`clustering.check_settings`, `kernels.select`).

  Returns:
    The run's `ClusterSchedule`, fresh (no epoch seen).
  Raises:
    UserError: a setting's message, naming it and the fix.
  """
  check_fields(config)
  _one_of(config.data.name, DATASETS, 'data.name')
  _one_of(config.model.arch, ARCHS, 'model.arch')
  _one_of(config.runtime.conv_impl, CONV_IMPLS, 'runtime.conv_impl')
  threads = config.runtime.xla_cpu_threads
  _require(isinstance(threads, int) and threads >= 0,
           f'runtime.xla_cpu_threads={threads!r} must be a whole number >= 0 (0: chosen for you)')
  _one_of(config.train.dtype, DTYPES, 'train.dtype')
  _one_of(config.clustering.backend, BACKENDS, 'clustering.backend')
  _one_of(config.clustering.levels, CLUSTER_LEVELS, 'clustering.levels')
  _one_of(config.clustering.pad_k, PAD_K, 'clustering.pad_k')
  _one_of(config.pcl.instance_loss, INSTANCE_LOSSES, 'pcl.instance_loss')
  reference = _reference_config()
  if reference is not None:
    _check_unread(config, reference)
  _one_of(config.schedule.mode, SCHEDULE_MODES, 'schedule.mode')
  _one_of(config.eval.feature_layer, FEATURE_LAYERS, 'eval.feature_layer')
  _one_of(config.eval.encoder, EVAL_ENCODERS, 'eval.encoder')
  _require(config.data.eval_resize in EVAL_RESIZES,
           f'data.eval_resize={config.data.eval_resize!r} is unknown; use one of '
           f'{", ".join(EVAL_RESIZES)} (whole: resize to the crop; center: resize to 8/7 of the '
           'crop, then the center crop; auto: whole for images stored at about the crop size)')
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
  # The queue wraps around (state.enqueue), so r need not be a multiple of the batch -- the
  # researcher's best run uses r=640 at batch 96 -- but it must hold one whole batch of keys.
  _require(r >= batch,
           f'pcl.num_negatives={r} is smaller than train.batch_size={batch}: the queue must hold '
           f'at least one batch of keys; use pcl.num_negatives >= {batch}')
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
  _require(not (config.eval.val_every and splits_overlap(config.data.train_split,
                                                         config.data.val_split)),
           f'data.val_split={config.data.val_split!r} is part of data.train_split='
           f'{config.data.train_split!r}: the validation kNN would find each image itself among '
           'the training references; set eval.val_every=0 or a data.val_split outside the '
           'training split')
  _require(config.eval.knn_k >= 1, f'eval.knn_k={config.eval.knn_k} must be >= 1')
  _require(config.eval.kmeans_runs >= 1,
           f'eval.kmeans_runs={config.eval.kmeans_runs} must be >= 1 (k-means runs averaged)')
  _require(config.eval.cluster_head_k >= 0,
           f'eval.cluster_head_k={config.eval.cluster_head_k} must be >= 0 (0: the run\'s '
           'coarsest cluster level)')
  _require(config.model.dim >= 1, f'model.dim={config.model.dim} must be >= 1')
  _require(config.checkpoint.every_epochs >= 1,
           f'checkpoint.every_epochs={config.checkpoint.every_epochs} must be >= 1')
  _require(config.checkpoint.max_to_keep >= 1,
           f'checkpoint.max_to_keep={config.checkpoint.max_to_keep} must be >= 1')
  _require(config.clustering.max_points_factor > 0,
           f'clustering.max_points_factor={config.clustering.max_points_factor} must be > 0')
  _require(0 <= config.clustering.min_points_factor <= config.clustering.max_points_factor,
           f'clustering.min_points_factor={config.clustering.min_points_factor} must be in '
           f'[0, clustering.max_points_factor={config.clustering.max_points_factor}]')
  _require(config.clustering.sinkhorn_epsilon > 0,
           f'clustering.sinkhorn_epsilon={config.clustering.sinkhorn_epsilon} must be > 0')
  _require(config.clustering.sinkhorn_iterations >= 1,
           f'clustering.sinkhorn_iterations={config.clustering.sinkhorn_iterations} must be >= 1')
  _require(config.eval.knn_t > 0, f'eval.knn_t={config.eval.knn_t} must be > 0')
  _require(config.eval.fewshot_episodes >= 1,
           f'eval.fewshot_episodes={config.eval.fewshot_episodes} must be >= 1')
  _require(config.eval.fewshot_queries >= 1,
           f'eval.fewshot_queries={config.eval.fewshot_queries} must be >= 1')
  if config.data.name == 'fake':
    _require(config.data.fake_size >= 1 and config.data.fake_classes >= 1,
             f'data.fake_size={config.data.fake_size} and data.fake_classes='
             f'{config.data.fake_classes} must be >= 1')
  if config.data.name in ('image_folder', 'mini_imagenet'):
    _require(bool(config.data.root), f'data.name={config.data.name} needs data.root=DIR '
             '(see README "Data layout")')
  _require(config.data.labels or config.data.name == 'image_folder',
           f'data.labels=False reads unlabelled image files, which data.name='
           f'{config.data.name} has not; use data.name=image_folder with data.root=DIR')
  _check_loss(config.pcl)
  return _checked_schedule(config)


def splits_overlap(first: str, second: str) -> bool:
  """Whether two split settings ('+'-joined names, e.g. 'train+val+test' and 'test') share a
  split, so that their images overlap."""
  names = lambda splits: {name.strip() for name in str(splits).split('+') if name.strip()}
  return bool(names(first) & names(second))


def validate_against_data(config, schedule, num_train: int) -> None:
  """Checks that need the training-set size N, of the config and the `schedule` that
  `validate` built from it."""
  batch = config.train.batch_size
  _require(num_train >= batch,
           f'train.batch_size={batch} is larger than the {num_train} training images of '
           f'data.train_split={config.data.train_split!r}; use a smaller batch')
  try:
    schedule.validate(num_train)  # k <= N for every listed k
  except ValueError as error:
    raise UserError(f'{error} (data.train_split={config.data.train_split!r})') from error


def config_changes(old: dict, new: dict, ignored=(), prefix: str = '') -> List[str]:
  """'section.field: old -> new' for every leaf that differs between two config dicts, except
  the paths in `ignored` (a field, or a whole section)."""
  changes = []
  for key in sorted(set(old) | set(new)):
    path = prefix + key
    if path in ignored:
      continue
    a, b = old.get(key), new.get(key)
    if isinstance(a, dict) and isinstance(b, dict):
      changes += config_changes(a, b, ignored, path + '.')
    elif a != b:
      changes.append(f'{path}: {a!r} -> {b!r}')
  return changes


def _instance_loss_of(switches: dict):
  """(pcl.instance_loss, its section's fields) that a saved config's loss switches (the
  `REPLACED_SWITCHES` of pcl, absent ones off) computed."""
  switch = lambda name, off=False: switches.get(name, off)
  smoothed = bool(switch('smooth_instance'))
  if switch('select_negatives'):
    return 'selected', {'smoothed': smoothed}
  if switch('attract_same_cluster'):
    return 'attract', {'level': switch('mask_level', 'finest'),
                       'share': switch('attract_share', 0.0), 'smoothed': smoothed}
  if switch('debias_prior', 0.0):
    _require(not switch('mask_same_cluster_negatives'),
             'this run combined pcl.mask_same_cluster_negatives with pcl.debias_prior, which no '
             'pcl.instance_loss computes; it can be neither resumed nor compared')
    return 'debiased', {'prior': switch('debias_prior')}
  if switch('mask_same_cluster_negatives'):
    return 'masked', {'level': switch('mask_level', 'finest'), 'smoothed': smoothed}
  return 'infonce', {'smoothed': smoothed}


def _translate_switches(upgraded: dict) -> None:
  """`REPLACED_SWITCHES` in a saved config dict, in place: the pcl switches become
  pcl.instance_loss and its section, clustering.hierarchical and clustering.balanced become
  clustering.levels."""
  replaced = {}
  for old in REPLACED_SWITCHES:
    section, name = old.split('.')
    if name in upgraded.get(section, {}):
      replaced.setdefault(section, {})[name] = upgraded[section].pop(name)
  if 'pcl' in replaced:
    form, fields = _instance_loss_of(replaced['pcl'])
    upgraded['pcl'].update({'instance_loss': form, form: fields})
  if 'clustering' in replaced:
    flags = replaced['clustering']
    upgraded['clustering']['levels'] = ('hierarchical' if flags.get('hierarchical') else
                                        'balanced' if flags.get('balanced') else 'flat')


def _complete(section: dict, defaults: dict) -> None:
  """Fields (of sections within sections too) that `section` lacks, at their `defaults`."""
  for name, value in defaults.items():
    if isinstance(value, dict) and isinstance(section.get(name), dict):
      _complete(section[name], value)
    else:
      section.setdefault(name, value)


def upgrade_saved_config(saved: dict) -> dict:
  """A config dict as a run directory stored it (config.json), with `RELOCATED_FIELDS` at their
  new places, `REPLACED_SWITCHES` translated and fields added since at their defaults, so it
  compares field by field with a current config.

  Raises:
    UserError: the saved switches combine in a way no current setting computes.
  """
  upgraded = copy.deepcopy(saved)
  for old, new in RELOCATED_FIELDS.items():
    old_section, old_name = old.split('.')
    new_section, new_name = new.split('.')
    if old_name in upgraded.get(old_section, {}):
      value = upgraded[old_section].pop(old_name)
      upgraded.setdefault(new_section, {}).setdefault(new_name, value)
  _translate_switches(upgraded)
  # A field added since the run was saved did not exist then: the run used its default.
  reference = _reference_config()
  for section, fields in (reference.to_dict().items() if reference else ()):
    if isinstance(fields, dict) and isinstance(upgraded.get(section), dict):
      _complete(upgraded[section], fields)
  return upgraded
