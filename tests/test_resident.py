"""Tests of `data.device_resident` (pcl_jax/data/resident.py): the training set on the devices,
batches gathered and drawn there, the feature pass from the same copy, exact resumption, and the
error for a set that does not fit."""

import jax
import numpy as np
import pytest

from configs import test as test_config
from pcl_jax import configuration
from pcl_jax.configuration import UserError
from pcl_jax.data import loaders
from pcl_jax.data import recipes
from pcl_jax.data import resident
from pcl_jax.data import sources
from pcl_jax import features as features_lib
from pcl_jax.run import parallel
from pcl_jax import train


def resident_config(epochs=2):
  config = test_config.get_config()
  config.data.device_resident = True
  config.train.epochs = epochs
  return config


@pytest.fixture(scope='module')
def trainer(tmp_path_factory):
  config = resident_config()
  return train.Trainer(config, str(tmp_path_factory.mktemp('resident')),
                       configuration.validate(config))


def test_batches_hold_the_loaders_images_in_its_order(trainer):
  config = trainer.config
  batches = list(trainer._train_batches(epoch=1))  # pylint: disable=protected-access
  assert len(batches) == trainer.steps_per_epoch
  order = loaders.epoch_order(trainer.datasets.num_train, config.seed, 1)
  images = trainer.datasets.train_eval.source.images
  batch_size = config.train.batch_size
  for step, batch in enumerate(batches):
    want = order[step * batch_size:(step + 1) * batch_size]
    np.testing.assert_array_equal(np.asarray(batch['index']), want)
    np.testing.assert_array_equal(np.asarray(batch['image']), images[want])
    draws = np.asarray(batch['augment_q'])
    assert draws.shape == (batch_size, len(recipes.AUGMENT_PARAMS))
    assert not np.array_equal(draws, np.asarray(batch['augment_k']))  # two views, two draws
  again = next(iter(trainer._train_batches(epoch=1)))  # pylint: disable=protected-access
  np.testing.assert_array_equal(np.asarray(again['augment_q']),
                                np.asarray(batches[0]['augment_q']))


def test_the_feature_pass_from_the_resident_copy_equals_the_hosts(trainer):
  state = trainer.initial_state()
  variables = {'params': state.key_params, 'batch_stats': state.key_batch_stats}
  dataset = trainer.datasets.train_eval
  host, labels = features_lib.extract_features(trainer.embed, variables, dataset, 48, 0,
                                               mesh=trainer.mesh)
  on_device, device_labels = features_lib.extract_features(
      trainer.embed, variables, dataset, 48, 0, mesh=trainer.mesh,
      resident=trainer.resident_images)
  np.testing.assert_array_equal(np.asarray(on_device), np.asarray(host))
  np.testing.assert_array_equal(device_labels, labels)


def _leaves(state):
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(state)]


def test_a_killed_resident_run_resumes_to_the_uninterrupted_result(tmp_path):
  config = resident_config(epochs=2)  # the warm-up epoch, then one with the E-step
  config.train.steps_per_epoch = 3
  straight = train.train_and_evaluate(config, str(tmp_path / 'straight'))
  resumed_dir = str(tmp_path / 'resumed')
  train.train_and_evaluate(config, resumed_dir, stop_after_epochs=1)
  resumed = train.train_and_evaluate(config, resumed_dir)
  for a, b in zip(_leaves(straight), _leaves(resumed)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_the_set_is_replicated_split_or_refused_by_its_size():
  mesh = parallel.data_mesh()
  gib = 2**30
  assert resident.resident_sharding(gib, mesh, 4 * gib) == parallel.replicated(mesh)
  # Split over several devices: tests/parallel_worker.py, on 8 of them.
  # One device: a set over half its memory cannot be split smaller, so it is refused.
  with pytest.raises(UserError) as error:
    resident.resident_sharding(3 * gib, mesh, 4 * gib)
  message = str(error.value)
  assert 'data.device_resident=True' in message and '3.00 GiB' in message
  assert '4.00 GiB' in message and 'data.device_resident=False' in message


def test_a_concatenation_of_split_caches_is_placed_whole():
  parts = [np.full((3, 4, 4, 3), value, np.uint8) for value in (1, 2)]
  placed = resident.place_images(sources.ConcatenatedImages(parts), parallel.data_mesh())
  np.testing.assert_array_equal(np.asarray(placed), np.concatenate(parts))


def test_a_set_too_large_for_the_device_stops_the_run_before_training(tmp_path, monkeypatch):
  monkeypatch.setattr(resident, 'device_memory_bytes', lambda device: 1000)
  config = resident_config()
  with pytest.raises(UserError, match='data.device_resident=True: the decoded training set'):
    train.Trainer(config, str(tmp_path), configuration.validate(config))
