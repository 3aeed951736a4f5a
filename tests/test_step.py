"""The step and its loss: each form of `pcl.instance_loss` wired into `losses.pcl_loss`, the
settings read from the config, and what the committed studies' settings computed under their old
names (tests/data/pinned_losses.json) computed again: the losses and one real jitted step."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import default as default_config
from configs import small_images
from configs import test as test_config
from pcl_jax.clustering import bank as bank_lib
from pcl_jax import configuration
from pcl_jax import losses
from pcl_jax import models
from pcl_jax.run import parallel
from pcl_jax import state as state_lib
from pcl_jax import step as step_lib
from pcl_jax.study import cells as study_cells
from test_losses import _embeddings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(ROOT, 'tests', 'data', 'pinned_losses.json')) as _handle:
  PINNED = json.load(_handle)


def _settings(overrides):
  """LossSettings of configs/test.py with the dotted `overrides` (validated)."""
  config = test_config.get_config()
  study_cells.apply_overrides(config, overrides, 'test')
  configuration.validate(config)
  return losses.LossSettings.from_config(config.pcl)


def test_loss_settings_read_the_config_and_default_to_published_pcl():
  assert _settings({}) == losses.LossSettings() == losses.LossSettings(losses.InfoNCE())
  settings = _settings({'pcl.instance_loss': 'attract', 'pcl.attract.share': 0.5,
                        'pcl.attract.level': 'graded', 'pcl.proto_weight': 0.5,
                        'pcl.proto_columns': 'reference'})
  assert settings == losses.LossSettings(losses.Attract(level='graded', share=0.5),
                                         proto_weight=0.5, proto_columns='reference')


def test_each_form_is_the_config_section_of_its_name_with_its_defaults():
  pcl = default_config.get_config().pcl
  assert set(losses.INSTANCE_FORMS) == set(configuration.INSTANCE_LOSSES)
  for name, form in losses.INSTANCE_FORMS.items():
    fields = {field.name: field.default for field in dataclasses.fields(form)}
    assert fields == pcl[name].to_dict(), name


@pytest.fixture(scope='module')
def active_bank():
  rng = np.random.default_rng(3)
  levels = [{'centroids': rng.normal(size=(k, 16)).astype(np.float32),
             'im2cluster': rng.integers(0, k, 64), 'concentration': np.full(k, 0.3, np.float32)}
            for k in (6, 3)]
  return bank_lib.prototype_bank(levels, 2, 6)


def _pcl_loss(instance, bank, queue_index, **settings):
  queries, keys, queue = _embeddings()
  settings = losses.LossSettings(instance, **settings)
  fn = jax.jit(lambda *a: losses.pcl_loss(*a, temperature=0.2, num_negatives=64,
                                          settings=settings))
  return fn(queries, keys, queue, queue_index, jnp.arange(8, 16), bank, jax.random.PRNGKey(0),
            jnp.float32(0.1))


def test_each_form_changes_the_loss_as_specified(active_bank):
  queue_index = jnp.asarray(np.random.default_rng(5).integers(-1, 64, 64))
  plain_loss, plain = _pcl_loss(losses.InfoNCE(), active_bank, queue_index)
  np.testing.assert_allclose(plain_loss, plain['loss_inst'] + plain['loss_proto'], rtol=1e-6)
  weighted_loss, weighted = _pcl_loss(losses.InfoNCE(), active_bank, queue_index,
                                      proto_weight=0.25)
  np.testing.assert_allclose(weighted_loss, plain['loss_inst'] + 0.25 * plain['loss_proto'],
                             rtol=1e-6)
  _, smoothed = _pcl_loss(losses.InfoNCE(smoothed=True), active_bank, queue_index)
  assert float(smoothed['loss_inst']) > float(plain['loss_inst'])
  np.testing.assert_allclose(smoothed['loss_proto'], plain['loss_proto'], rtol=1e-6)
  _, reference = _pcl_loss(losses.InfoNCE(), active_bank, queue_index,
                           proto_columns='reference')
  assert float(reference['acc_proto']) <= float(plain['acc_proto'])
  assert float(reference['loss_proto']) != float(plain['loss_proto'])
  _, debiased = _pcl_loss(losses.Debiased(prior=0.1), active_bank, queue_index)
  assert float(debiased['loss_inst']) != float(plain['loss_inst'])
  assert float(debiased['acc_inst']) == float(plain['acc_inst'])
  _, masked = _pcl_loss(losses.Masked(), active_bank, queue_index)
  assert float(masked['loss_inst']) < float(plain['loss_inst'])
  # Attraction: the same keys become InfoNCE's extra positives.
  _, attracted = _pcl_loss(losses.Attract(), active_bank, queue_index)
  queries, keys, queue = _embeddings()
  same = losses.same_cluster(jnp.arange(8, 16), queue_index, active_bank)
  assert bool(same.any())
  expected, _ = losses.attract_info_nce(queries, keys, queue, 0.2, same)
  np.testing.assert_allclose(attracted['loss_inst'], expected, rtol=1e-5)
  assert float(attracted['loss_inst']) > float(plain['loss_inst'])
  np.testing.assert_allclose(attracted['loss_proto'], plain['loss_proto'], rtol=1e-6)
  # ... weighted: the share, and graded weights over the levels.
  _, shared = _pcl_loss(losses.Attract(share=0.5), active_bank, queue_index)
  expected, _ = losses.attract_info_nce(queries, keys, queue, 0.2, same, share=0.5)
  np.testing.assert_allclose(shared['loss_inst'], expected, rtol=1e-5)
  _, graded = _pcl_loss(losses.Attract(level='graded'), active_bank, queue_index)
  fraction = losses.same_cluster(jnp.arange(8, 16), queue_index, active_bank, 'graded')
  expected, _ = losses.attract_info_nce(queries, keys, queue, 0.2, fraction)
  np.testing.assert_allclose(graded['loss_inst'], expected, rtol=1e-5)
  assert float(graded['loss_inst']) != float(attracted['loss_inst'])
  # With no queue row of a known sample, the mask removes nothing.
  _, unknown = _pcl_loss(losses.Masked(), active_bank, jnp.full((64,), -1))
  np.testing.assert_allclose(unknown['loss_inst'], plain['loss_inst'], rtol=1e-6)


def _pinned_bank():
  """The pinned active bank (tests/data/pin_losses.py at d27d4e0): levels of 6 and 3
  prototypes, a third slot unused."""
  rng = np.random.default_rng(6)
  levels = [{'centroids': rng.normal(size=(k, 16)).astype(np.float32),
             'im2cluster': rng.integers(0, k, 64),
             'concentration': rng.uniform(0.05, 0.5, k).astype(np.float32)} for k in (6, 3)]
  return bank_lib.prototype_bank(levels, 3, 6)


def test_the_selected_form_wires_the_selection_into_pcl_loss():
  bank = _pinned_bank()
  queue_index = jnp.full((64,), -1)  # the selection reads embeddings, not dataset indices
  _, plain = _pcl_loss(losses.InfoNCE(), bank, queue_index)
  _, selected = _pcl_loss(losses.Selected(), bank, queue_index)
  queries, keys, queue = _embeddings()
  # The selection's stream is rng folded with 1; the prototype sample keeps rng itself.
  drawn = losses.select_negatives(queue, jnp.arange(8, 16), bank,
                                  jax.random.fold_in(jax.random.PRNGKey(0), 1))
  expected, _ = losses.selected_info_nce(queries, keys, queue, 0.2, drawn, bank['active'])
  np.testing.assert_allclose(selected['loss_inst'], expected, rtol=1e-6)
  assert float(selected['loss_inst']) < float(plain['loss_inst'])  # fewer negatives
  np.testing.assert_allclose(selected['loss_proto'], plain['loss_proto'], rtol=1e-6)


# What the committed studies' loss settings computed under their old names (pcl.* switches):
# the old config's switches, as a run directory saved them, read by upgrade_saved_config.


def _translated_pcl(switches):
  """The pcl section of configs/small_images_plain.py as the old code saved it, with the old
  `switches` set, translated to the current settings."""
  saved = {'pcl': dict(PINNED['studies']['remedies.py']['plain']['pcl'], **switches)}
  return ml_collections.ConfigDict(configuration.upgrade_saved_config(saved)['pcl'])


def _record(loss, terms, grad):
  """A loss as the pin recorded it (tests/data/pin_losses.py at d27d4e0): its terms and two
  projections of its gradient."""
  projection = np.random.default_rng(8).normal(size=(8, 16)).astype(np.float32)
  out = {name: float(value) for name, value in dict(terms, loss=loss).items()}
  out['grad_norm'] = float(jnp.linalg.norm(grad))
  out['grad_projection'] = float(jnp.sum(grad * projection))
  return out


@pytest.mark.parametrize('name', sorted(PINNED['losses']))
def test_each_committed_loss_setting_computes_what_its_old_switches_did(name):
  pinned = PINNED['losses'][name]
  settings = losses.LossSettings.from_config(_translated_pcl(pinned['switches']))
  queries, keys, queue = _embeddings()
  queue_index = jnp.asarray(np.random.default_rng(5).integers(-1, 64, 64))
  def loss_fn(q, bank):
    return losses.pcl_loss(q, keys, queue, queue_index, jnp.arange(8, 16), bank,
                           jax.random.PRNGKey(0), jnp.float32(0.1), temperature=0.2,
                           num_negatives=64, settings=settings)
  loss_and_grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))  # one program, both banks
  active = _pinned_bank()
  for bank_name, bank in (('active', active), ('warmup', dict(active, active=jnp.zeros(3, bool)))):
    (loss, terms), grad = loss_and_grad(queries, bank)
    got, want = _record(loss, terms, grad), pinned[bank_name]
    assert set(got) == set(want)
    for quantity in want:
      np.testing.assert_allclose(got[quantity], want[quantity], rtol=1e-6, atol=1e-7,
                                 err_msg=f'{name} {bank_name} {quantity}')


def test_the_recipe_s_step_computes_what_it_did_and_records_the_queue_s_dataset_indices():
  """One jitted `make_train_step` of configs/test.py with configs/small_images.py's RECIPE (the
  pinned step ran its old switches), on the pinned state, batch and bank
  (tests/data/pin_losses.py at d27d4e0)."""
  config = test_config.get_config()
  study_cells.apply_overrides(config, small_images.RECIPE, 'test')
  old_names = PINNED['step']['overrides']
  old_settings = _translated_pcl({key.split('.')[1]: value for key, value in old_names.items()})
  assert (losses.LossSettings.from_config(config.pcl)
          == losses.LossSettings.from_config(old_settings))
  model = models.encoder_from_config(config, bn_groups=2)
  schedule = state_lib.make_lr_schedule(config.optim, 2, 4)
  tx = state_lib.make_optimizer(config.optim, schedule)
  state = state_lib.create_state(jax.random.PRNGKey(0), model, tx, 16, config.pcl.num_negatives)
  state = jax.device_put(state, parallel.replicated(parallel.data_mesh()))
  rng = np.random.default_rng(2)
  batch = {view: rng.integers(0, 256, (32, 16, 16, 3), dtype=np.uint8)
           for view in ('im_q', 'im_k')}
  batch['index'] = np.arange(32)
  initial_queue_index = np.random.default_rng(9).integers(-1, 64, 64)
  state = state.replace(queue_index=jnp.asarray(initial_queue_index))
  bank = dict(_pinned_bank(),
              im2cluster=jnp.asarray(np.random.default_rng(10).integers(0, 3, (3, 1797))))
  step = step_lib.make_train_step(config, model)
  new_state, metrics = step(state, batch, bank, step_lib.step_hparams(0.1, 2, 4))
  got = {name: float(value) for name, value in metrics.items()}
  got['params_sum'] = float(sum(jnp.sum(leaf) for leaf in jax.tree.leaves(new_state.params)))
  want = PINNED['step']['metrics']
  assert set(got) == set(want)
  for quantity in want:
    np.testing.assert_allclose(got[quantity], want[quantity], rtol=1e-5, err_msg=quantity)
  # The queue records each key's dataset index; the rows not written keep theirs.
  queue_index = np.asarray(new_state.queue_index)
  np.testing.assert_array_equal(queue_index[:32], np.arange(32))
  np.testing.assert_array_equal(queue_index[32:], initial_queue_index[32:])
