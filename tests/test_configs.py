"""Every config file loads, passes start-up validation, and has its launch command."""

import glob
import importlib
import json
import os
import re

import pytest

from pcl_jax import cluster_schedule
from pcl_jax import clustering
from pcl_jax import configuration
from tests import cli_forkserver

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, 'configs', '*.py'))
               if not p.endswith('__init__.py'))


@pytest.mark.parametrize('name', NAMES)
def test_config_validates_and_documents_its_command(name):
  module = importlib.import_module(f'configs.{name}')
  config = module.get_config()
  if config.data.name in ('mini_imagenet', 'image_folder'):
    config.data.root = '/data/mini-imagenet'  # validate() checks fields, not the disk
  configuration.validate(config)
  assert f'--config=configs/{name}.py' in module.__doc__ or name == 'default'
  assert 'python -m pcl_jax.main' in module.__doc__


def test_mini_imagenet_is_the_researchers_best_run():
  from configs import mini_imagenet  # pylint: disable=g-import-not-at-top
  config = mini_imagenet.get_config()
  assert (config.model.arch, config.data.image_size, config.train.batch_size) == ('resnet18', 84,
                                                                                  96)
  assert (config.optim.lr, config.optim.cos, config.pcl.num_negatives) == (0.08, True, 640)
  assert (config.pcl.moco_m, config.pcl.temperature, config.data.aug_plus) == (0.999, 0.2, False)
  assert config.schedule.all_clusters == '3200,2400,1600,800,400,200,100,50,25,20,10,5,2'
  # All 100 classes, as the notes: evaluation on classes seen in pretraining (transductive).
  assert (config.data.train_split, config.data.eval_split) == ('train+val+test', 'test')
  assert 'transductive' in mini_imagenet.__doc__


@pytest.mark.parametrize('name', [n for n in NAMES if n.startswith('mini_imagenet')])
def test_mini_imagenet_configs_say_which_protocol_they_follow(name):
  """mini_imagenet_fewshot: the standard protocol (64 train classes, 20 unseen test classes);
  every other mini_imagenet config pretrains on all 100 (transductive) and says so."""
  from pcl_jax.evaluation import driver  # pylint: disable=g-import-not-at-top
  module = importlib.import_module(f'configs.{name}')
  config = module.get_config()
  assert config.data.eval_split == 'test'
  if name == 'mini_imagenet_fewshot':
    assert (config.data.train_split, config.data.val_split) == ('train', 'val')
    assert not driver.eval_split_in_training(config)
    assert 'standard few-shot protocol' in module.__doc__
    reference = importlib.import_module('configs.mini_imagenet').get_config()
    for section in ('model', 'train', 'optim', 'pcl', 'schedule'):
      assert config[section].to_dict() == reference[section].to_dict()
  else:
    assert config.data.train_split == 'train+val+test'
    assert driver.eval_split_in_training(config)  # kNN / probe on within-test halves
    assert config.eval.val_every == 0  # val is inside the training split
    assert 'transductive' in module.__doc__ and 'mini_imagenet_fewshot.py' in module.__doc__


@pytest.mark.parametrize('pair', [('digits', 'digits_ascending'),
                                  ('mini_imagenet', 'mini_imagenet_ascending')])
def test_schedule_pairs_run_in_opposite_directions(pair):
  lists = [cluster_schedule.parse_cluster_list(importlib.import_module(f'configs.{n}')
                                               .get_config().schedule.all_clusters) for n in pair]
  assert lists[0] == sorted(lists[0], reverse=True) and lists[1] == sorted(lists[1])


def test_a_validation_split_inside_the_training_split_is_refused():
  from configs import mini_imagenet  # pylint: disable=g-import-not-at-top
  config = mini_imagenet.get_config()
  config.data.root = '/data/mini-imagenet'
  config.eval.val_every = 5
  with pytest.raises(configuration.UserError,
                     match=r"data\.val_split='val' is part of data\.train_split='train\+val\+test'"):
    configuration.validate(config)
  config.data.train_split = 'train'
  configuration.validate(config)


@pytest.mark.parametrize('changes, message', [
    ({'pcl.proto_columns': 'official'}, "pcl.proto_columns='official' is unknown"),
    ({'pcl.instance_loss': 'mask'}, "pcl.instance_loss='mask' is unknown"),
    ({'pcl.instance_loss': 'masked', 'pcl.masked.level': 'graded'},
     "pcl.masked.level='graded' is unknown"),
    ({'pcl.instance_loss': 'attract', 'pcl.attract.level': 'middle'},
     "pcl.attract.level='middle' is unknown"),
    ({'pcl.proto_weight': -1.0}, 'pcl.proto_weight=-1.0 must be >= 0'),
    ({'pcl.instance_loss': 'debiased', 'pcl.debiased.prior': 1.0},
     'pcl.debiased.prior=1.0 must be in (0, 1)'),
    ({'pcl.instance_loss': 'debiased', 'pcl.debiased.prior': 0.0},
     'pcl.debiased.prior=0.0 must be in (0, 1)'),
    ({'pcl.instance_loss': 'attract', 'pcl.attract.share': 1.0},
     'pcl.attract.share=1.0 must be in [0, 1)'),
    # A setting of a form that is not the chosen one would change nothing.
    ({'pcl.attract.share': 0.5},
     "pcl.attract.share=0.5 is read only with pcl.instance_loss='attract', and "
     "pcl.instance_loss is 'infonce'"),
    ({'pcl.instance_loss': 'debiased', 'pcl.infonce.smoothed': True},
     "pcl.infonce.smoothed=True is read only with pcl.instance_loss='infonce'"),
    ({'pcl.instance_loss': 'selected', 'pcl.masked.level': 'coarsest'},
     "pcl.masked.level='coarsest' is read only with pcl.instance_loss='masked'"),
    ({'eval.kmeans_runs': 0}, 'eval.kmeans_runs=0 must be >= 1'),
    ({'eval.cluster_head': True, 'eval.cluster_head_k': -1},
     'eval.cluster_head_k=-1 must be >= 0'),
    ({'eval.cluster_head': False, 'eval.cluster_head_k': 5},
     'eval.cluster_head_k=5 is read only with eval.cluster_head=True'),
    ({'clustering.levels': 'agglomerative'}, "clustering.levels='agglomerative' is unknown"),
    ({'clustering.pad_k': 'always'},
     "clustering.pad_k='always' is unknown; use one of auto, max, exact"),
    ({'clustering.levels': 'balanced', 'clustering.sinkhorn_epsilon': 0.0},
     'clustering.sinkhorn_epsilon=0.0 must be > 0'),
    ({'clustering.levels': 'balanced', 'clustering.sinkhorn_iterations': 0},
     'clustering.sinkhorn_iterations=0 must be >= 1'),
    ({'clustering.levels': 'hierarchical', 'clustering.sinkhorn_epsilon': 0.1},
     "clustering.sinkhorn_epsilon=0.1 is read only with clustering.levels='balanced'"),
])
def test_bad_loss_clustering_and_eval_settings_are_named(changes, message):
  from configs import test as test_config  # pylint: disable=g-import-not-at-top
  from pcl_jax.study import cells as study_cells  # pylint: disable=g-import-not-at-top
  config = test_config.get_config()
  study_cells.apply_overrides(config, changes, 'test')
  with pytest.raises(configuration.UserError, match=re.escape(message)):
    configuration.validate(config)
    clustering.check_settings(config)


@pytest.mark.parametrize('changes', [
    {'pcl.instance_loss': 'attract', 'pcl.attract.share': 0.5, 'pcl.attract.level': 'graded',
     'pcl.attract.smoothed': True},
    {'pcl.instance_loss': 'masked', 'pcl.masked.level': 'coarsest', 'pcl.masked.smoothed': True},
    {'pcl.instance_loss': 'debiased', 'pcl.debiased.prior': 0.05},
    {'pcl.instance_loss': 'selected', 'pcl.selected.smoothed': True},
    {'clustering.levels': 'balanced', 'clustering.sinkhorn_epsilon': 0.1,
     'clustering.sinkhorn_iterations': 5},
])
def test_each_choice_reads_its_own_settings(changes):
  from configs import test as test_config  # pylint: disable=g-import-not-at-top
  from pcl_jax.study import cells as study_cells  # pylint: disable=g-import-not-at-top
  config = test_config.get_config()
  study_cells.apply_overrides(config, changes, 'test')
  configuration.validate(config)


def _old_switch_value(old):
  """A value of the old setting `old` that was not its default (what a user would set)."""
  return {'pcl.mask_level': 'coarsest', 'pcl.attract_share': 0.5,
          'pcl.debias_prior': 0.1}.get(old, True)


@pytest.mark.parametrize('old', sorted(configuration.REPLACED_SWITCHES))
def test_an_old_switch_in_a_config_file_or_a_study_file_names_the_new_setting(old, monkeypatch):
  from configs import test as test_config  # pylint: disable=g-import-not-at-top
  from pcl_jax.study import cells as study_cells  # pylint: disable=g-import-not-at-top
  from pcl_jax.study import spec as study_spec  # pylint: disable=g-import-not-at-top
  new = configuration.REPLACED_SWITCHES[old]
  config = test_config.get_config()
  section, name = old.split('.')
  with config.unlocked():
    config[section][name] = _old_switch_value(old)
  with pytest.raises(configuration.UserError,
                     match=re.escape(f'unknown field {old}; it is now {new}')):
    configuration.check_fields(config)
  monkeypatch.chdir(ROOT)
  study = study_spec.study_from_dict({'config': 'configs/test.py', 'overrides': {},
                                  'variants': {'plain': {}, 'old': {old: _old_switch_value(old)}},
                                  'baseline': 'plain', 'seeds': [0, 1, 2]}, 'old_names.py')
  with pytest.raises(configuration.UserError,
                     match=re.escape(f"variant 'old': the config has an unknown field {old}; "
                                     f'it is now {new}')):
    study_cells.cell_configs(study)


@pytest.fixture(scope='module')
def old_switch_runs(tmp_path_factory):
  """`python -m pcl_jax.main --config.OLD=VALUE` for every old switch, each in a child of
  tests/cli_forkserver.py (the program as `python -m` runs it; JAX imported once for all)."""
  base = tmp_path_factory.mktemp('old_switches')
  return cli_forkserver.run_commands(
      {old: ['--config=configs/test.py', f'--workdir={base / old}',
             f'--config.{old}={_old_switch_value(old)}']
       for old in sorted(configuration.REPLACED_SWITCHES)}, base)


@pytest.mark.parametrize('old', sorted(configuration.REPLACED_SWITCHES))
def test_an_old_switch_on_the_command_line_names_the_new_setting(old, old_switch_runs):
  result = old_switch_runs[old]
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f'error: --config.{old}: '), result.stderr
  assert f'(it is now --config.{configuration.REPLACED_SWITCHES[old]})' in lines[0]


def test_a_run_saved_before_the_eval_settings_reads_them_at_their_defaults():
  """tests/data/legacy_run's config.json predates data.eval_resize and eval.encoder: it compares
  (and its checkpoints evaluate) as a run with the defaults."""
  import json  # pylint: disable=g-import-not-at-top
  with open(os.path.join(ROOT, 'tests', 'data', 'legacy_run', 'config.json')) as handle:
    saved = json.load(handle)
  assert 'eval_resize' not in saved['data'] and 'encoder' not in saved['eval']
  upgraded = configuration.upgrade_saved_config(saved)
  assert (upgraded['data']['eval_resize'], upgraded['eval']['encoder']) == ('auto', 'key')


def test_a_run_saved_before_the_loss_and_clustering_choices_reads_as_published_pcl():
  """tests/data/legacy_run's config.json has no loss switch and clustering.hierarchical=False:
  it compares with configs/test.py as a run of the defaults (infonce, flat levels)."""
  from configs import test as test_config  # pylint: disable=g-import-not-at-top
  with open(os.path.join(ROOT, 'tests', 'data', 'legacy_run', 'config.json')) as handle:
    saved = json.load(handle)
  assert saved['clustering']['hierarchical'] is False and 'instance_loss' not in saved['pcl']
  upgraded = configuration.upgrade_saved_config(saved)
  assert 'hierarchical' not in upgraded['clustering']
  assert (upgraded['pcl']['instance_loss'], upgraded['clustering']['levels']) == ('infonce',
                                                                                 'flat')
  # configs/test.py has changed two evaluation settings since; the loss and clustering none.
  changes = configuration.config_changes(upgraded, test_config.get_config().to_dict())
  assert changes == ['eval.cluster_head: True -> False', 'eval.kmeans_runs: 10 -> 2']


@pytest.mark.parametrize('switches, expected', [
    ({'attract_same_cluster': True, 'attract_share': 0.5, 'mask_level': 'graded',
      'smooth_instance': True},
     ('attract', {'level': 'graded', 'share': 0.5, 'smoothed': True})),
    ({'mask_same_cluster_negatives': True, 'mask_level': 'coarsest'},
     ('masked', {'level': 'coarsest', 'smoothed': False})),
    ({'debias_prior': 0.05}, ('debiased', {'prior': 0.05})),
    ({'select_negatives': True, 'smooth_instance': True}, ('selected', {'smoothed': True})),
    ({'smooth_instance': True}, ('infonce', {'smoothed': True})),
    ({'mask_level': 'coarsest'}, ('infonce', {'smoothed': False})),  # it did nothing alone
])
def test_saved_loss_switches_read_as_the_instance_loss_they_computed(switches, expected):
  from configs import default  # pylint: disable=g-import-not-at-top
  off = {'mask_same_cluster_negatives': False, 'attract_same_cluster': False,
         'mask_level': 'finest', 'attract_share': 0.0, 'smooth_instance': False,
         'debias_prior': 0.0, 'select_negatives': False}
  saved = {'pcl': {'temperature': 0.1, 'proto_weight': 0.5, **off, **switches},
           'clustering': {'balanced': True, 'niter': 10}}
  upgraded = configuration.upgrade_saved_config(saved)
  form, fields = expected
  pcl = default.get_config().pcl.to_dict()
  pcl.update({'temperature': 0.1, 'proto_weight': 0.5, 'instance_loss': form})
  pcl[form].update(fields)
  assert upgraded['pcl'] == pcl
  assert upgraded['clustering']['levels'] == 'balanced' and upgraded['clustering']['niter'] == 10
  assert 'balanced' in saved['clustering']  # the input is left as it was


def test_saved_switches_that_no_instance_loss_computes_are_refused():
  saved = {'pcl': {'mask_same_cluster_negatives': True, 'debias_prior': 0.1}}
  with pytest.raises(configuration.UserError, match='no pcl.instance_loss computes'):
    configuration.upgrade_saved_config(saved)


STUDIES = sorted(glob.glob(os.path.join(ROOT, 'configs', 'studies', '*.py')))


@pytest.mark.parametrize('path', STUDIES, ids=os.path.basename)
def test_study_file_loads_and_every_cell_validates(path, monkeypatch):
  # pylint: disable=g-import-not-at-top
  from pcl_jax.study import cells as study_cells
  from pcl_jax.study import spec as study_spec
  # pylint: enable=g-import-not-at-top
  monkeypatch.chdir(ROOT)
  loaded = study_spec.load_study(path)
  cells = study_cells.cell_configs(loaded, {'data.root': '/data/images'})
  study_cells.validate_cells(cells)
  assert len(cells) == len(loaded.variants) * len(loaded.seeds) and len(loaded.seeds) >= 3


def test_the_small_image_recipe_is_plain_pcl_plus_its_recipe():
  from configs import small_images, small_images_plain  # pylint: disable=g-import-not-at-top
  recipe, plain = small_images.get_config(), small_images_plain.get_config()
  for dotted, value in small_images.RECIPE.items():
    *sections, name = dotted.split('.')
    recipe_node, plain_node = recipe, plain
    for section in sections:
      recipe_node, plain_node = recipe_node[section], plain_node[section]
    assert recipe_node[name] == value and plain_node[name] != value
    plain_node[name] = value
  assert recipe.to_dict() == plain.to_dict()


@pytest.mark.parametrize('path', STUDIES, ids=os.path.basename)
def test_a_study_s_finished_cells_see_no_change_under_the_new_names(path, tmp_path, monkeypatch):
  """Each cell directory as the old code wrote it (config.json with the loss switches and
  clustering flags, tests/data/pinned_losses.json) compares equal with what the study file now
  asks, for the study runner (`check_cell_config`) and for resume (`config_changes`)."""
  from pcl_jax.study import cells as study_cells  # pylint: disable=g-import-not-at-top
  from pcl_jax.study import spec as study_spec  # pylint: disable=g-import-not-at-top
  with open(os.path.join(ROOT, 'tests', 'data', 'pinned_losses.json')) as handle:
    old_sections = json.load(handle)['studies'][os.path.basename(path)]
  monkeypatch.chdir(ROOT)
  study = study_spec.load_study(os.path.relpath(path, ROOT))
  cells = study_cells.cell_configs(study, {'data.root': '/data/images'})
  assert {cell.variant for cell in cells} == set(old_sections)
  for cell in cells:
    saved = dict(cell.config.to_dict(), **old_sections[cell.variant])
    os.makedirs(cell.workdir(str(tmp_path)))
    with open(os.path.join(cell.workdir(str(tmp_path)), 'config.json'), 'w') as handle:
      json.dump(saved, handle)
    study_cells.check_cell_config(cell, str(tmp_path))
    upgraded = configuration.upgrade_saved_config(saved)
    assert configuration.config_changes(upgraded, cell.config.to_dict()) == [], cell.name
