"""Every config file loads, passes start-up validation, and has its launch command."""

import glob
import importlib
import os
import re

import pytest

from pcl_jax import cluster_schedule
from pcl_jax import clustering
from pcl_jax import configuration

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
    ({'pcl.mask_level': 'middle'}, "pcl.mask_level='middle' is unknown"),
    ({'pcl.proto_weight': -1.0}, 'pcl.proto_weight=-1.0 must be >= 0'),
    ({'pcl.debias_prior': 1.0}, 'pcl.debias_prior=1.0 must be in [0, 1)'),
    ({'pcl.debias_prior': 0.1, 'pcl.smooth_instance': True}, 'set one of them off'),
    ({'pcl.mask_same_cluster_negatives': True, 'pcl.attract_same_cluster': True},
     'pcl.attract_same_cluster makes them positives; set one of them off'),
    ({'pcl.debias_prior': 0.1, 'pcl.attract_same_cluster': True},
     'pcl.debias_prior assumes one positive'),
    ({'pcl.attract_same_cluster': True, 'pcl.attract_share': 1.0},
     'pcl.attract_share=1.0 must be in [0, 1)'),
    ({'pcl.attract_share': 0.5}, 'does nothing without pcl.attract_same_cluster=True'),
    ({'pcl.mask_same_cluster_negatives': True, 'pcl.mask_level': 'graded'},
     'pcl.mask_level=graded weighs keys for pcl.attract_same_cluster'),
    ({'eval.kmeans_runs': 0}, 'eval.kmeans_runs=0 must be >= 1'),
    ({'pcl.select_negatives': True, 'pcl.attract_same_cluster': True},
     'does not combine with pcl.attract_same_cluster; set one of them off'),
    ({'pcl.select_negatives': True, 'pcl.mask_same_cluster_negatives': True,
      'pcl.debias_prior': 0.1},
     'does not combine with pcl.mask_same_cluster_negatives, pcl.debias_prior'),
    ({'clustering.sinkhorn_epsilon': 0.0}, 'clustering.sinkhorn_epsilon=0.0 must be > 0'),
    ({'clustering.sinkhorn_iterations': 0}, 'clustering.sinkhorn_iterations=0 must be >= 1'),
    ({'clustering.balanced': True, 'clustering.hierarchical': True},
     'clustering.balanced=True balances flat levels only'),
])
def test_conflicting_or_bad_loss_and_eval_settings_are_named(changes, message):
  from configs import test as test_config  # pylint: disable=g-import-not-at-top
  config = test_config.get_config()
  for dotted, value in changes.items():
    section, name = dotted.split('.')
    config[section][name] = value
  with pytest.raises(configuration.UserError, match=re.escape(message)):
    configuration.validate(config)
    clustering.check_settings(config)


def test_a_run_saved_before_the_eval_settings_reads_them_at_their_defaults():
  """tests/data/legacy_run's config.json predates data.eval_resize and eval.encoder: it compares
  (and its checkpoints evaluate) as a run with the defaults."""
  import json  # pylint: disable=g-import-not-at-top
  with open(os.path.join(ROOT, 'tests', 'data', 'legacy_run', 'config.json')) as handle:
    saved = json.load(handle)
  assert 'eval_resize' not in saved['data'] and 'encoder' not in saved['eval']
  upgraded = configuration.upgrade_saved_config(saved)
  assert (upgraded['data']['eval_resize'], upgraded['eval']['encoder']) == ('auto', 'key')


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
    section, name = dotted.split('.')
    assert recipe[section][name] == value and plain[section][name] != value
    plain[section][name] = value
  assert recipe.to_dict() == plain.to_dict()
