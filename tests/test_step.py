"""The step's loss switches (step.LossSwitches): the same-cluster mask against numpy, the queue's
dataset indices in one real jitted step, and each switch's effect on `pcl_loss`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import test as test_config
from pcl_jax.clustering import bank as bank_lib
from pcl_jax import losses
from pcl_jax import models
from pcl_jax.run import parallel
from pcl_jax import state as state_lib
from pcl_jax import step as step_lib


def _bank(rng, num_samples, sizes, active):
  """A prototype bank whose levels have `sizes` prototypes, `active` marking the live ones."""
  levels = [{'centroids': rng.normal(size=(k, 4)).astype(np.float32),
             'im2cluster': rng.integers(0, k, num_samples),
             'concentration': np.ones(k, np.float32)} for k in sizes]
  bank = bank_lib.prototype_bank(levels, len(sizes), max(sizes))
  bank['active'] = jnp.asarray(active)
  return bank, levels


@pytest.mark.parametrize('level, expected_level', [('finest', 0), ('coarsest', 2)])
def test_same_cluster_negatives_matches_numpy_at_the_chosen_active_level(level, expected_level):
  rng = np.random.default_rng(0)
  # Active: k=5 (finest) and k=3 (coarsest); the inactive k=12 level is neither.
  bank, levels = _bank(rng, 50, (5, 12, 3), [True, False, True])
  index = rng.integers(0, 50, 6)
  queue_index = rng.integers(-1, 50, 20)
  mask = np.asarray(step_lib.same_cluster_negatives(jnp.asarray(index), jnp.asarray(queue_index),
                                                    bank, level))
  clusters = levels[expected_level]['im2cluster']
  expected = np.array([[j >= 0 and clusters[j] == clusters[i] for j in queue_index]
                       for i in index])
  np.testing.assert_array_equal(mask, expected)


def test_nothing_is_masked_during_warm_up():
  rng = np.random.default_rng(1)
  bank, _ = _bank(rng, 10, (2, 2), [False, False])
  for level in ('finest', 'coarsest'):
    mask = step_lib.same_cluster_negatives(jnp.arange(4), jnp.arange(8), bank, level)
    assert not np.asarray(mask).any()


def test_loss_switches_read_the_config_and_default_to_published_pcl():
  config = test_config.get_config()
  assert step_lib.LossSwitches.from_config(config.pcl) == step_lib.LossSwitches()
  config.pcl.proto_weight = 0.5
  config.pcl.proto_columns = 'reference'
  switches = step_lib.LossSwitches.from_config(config.pcl)
  assert switches.proto_weight == 0.5 and switches.proto_columns == 'reference'


def _one_step(switches, bank):
  config = test_config.get_config()
  model = models.encoder_from_config(config, bn_groups=2)
  schedule = state_lib.make_lr_schedule(config.optim, 2, 4)
  tx = state_lib.make_optimizer(config.optim, schedule)
  state = state_lib.create_state(jax.random.PRNGKey(0), model, tx, 16, config.pcl.num_negatives)
  state = jax.device_put(state, parallel.replicated(parallel.data_mesh()))
  step = jax.jit(lambda s, b, k, h: step_lib.train_step(
      s, b, k, h, model=model, tx=tx, lr_schedule=schedule, temperature=0.2, moco_m=0.99,
      num_negatives=config.pcl.num_negatives, switches=switches))
  rng = np.random.default_rng(2)
  batch = {view: rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8) for view in ('im_q', 'im_k')}
  batch['index'] = np.arange(8, 16)
  return step(state, batch, bank, {'smoothing': jnp.float32(0.1)})


def test_same_cluster_fraction_matches_numpy_over_the_active_levels():
  rng = np.random.default_rng(1)
  bank, levels = _bank(rng, 50, (5, 12, 3), [True, False, True])
  index = rng.integers(0, 50, 6)
  queue_index = rng.integers(-1, 50, 20)
  fraction = np.asarray(step_lib.same_cluster_fraction(jnp.asarray(index),
                                                       jnp.asarray(queue_index), bank))
  active = [levels[0]['im2cluster'], levels[2]['im2cluster']]
  expected = np.array([[np.mean([c[j] == c[i] for c in active]) if j >= 0 else 0.0
                        for j in queue_index] for i in index])
  np.testing.assert_allclose(fraction, expected)
  assert {0.0, 0.5, 1.0} >= set(np.unique(fraction)) and (fraction == 0.5).any()
  bank['active'] = jnp.zeros(3, bool)  # warm-up: nothing attracted
  assert not np.asarray(step_lib.same_cluster_fraction(jnp.asarray(index),
                                                       jnp.asarray(queue_index), bank)).any()


@pytest.fixture(scope='module')
def active_bank():
  rng = np.random.default_rng(3)
  levels = [{'centroids': rng.normal(size=(k, 16)).astype(np.float32),
             'im2cluster': rng.integers(0, k, 64), 'concentration': np.full(k, 0.3, np.float32)}
            for k in (6, 3)]
  return bank_lib.prototype_bank(levels, 2, 6)


def test_the_queue_records_each_key_s_dataset_index(active_bank):
  state, _ = _one_step(step_lib.LossSwitches(), active_bank)
  queue_index = np.asarray(state.queue_index)
  np.testing.assert_array_equal(queue_index[:8], np.arange(8, 16))
  assert (queue_index[8:] == -1).all()


def _embeddings(seed=4):
  """Unit queries [8, 16], keys near them, and a queue [64, 16]."""
  rng = np.random.default_rng(seed)
  unit = lambda shape: (lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True))(
      rng.normal(size=shape).astype(np.float32))
  queries, queue = unit((8, 16)), unit((64, 16))
  keys = unit((8, 16)) + queries
  keys /= np.linalg.norm(keys, axis=-1, keepdims=True)
  return queries, keys, queue


def _pcl_loss(switches, bank, queue_index):
  queries, keys, queue = _embeddings()
  fn = jax.jit(lambda *a: step_lib.pcl_loss(*a, temperature=0.2, num_negatives=64,
                                            switches=switches))
  return fn(queries, keys, queue, queue_index, jnp.arange(8, 16), bank, jax.random.PRNGKey(0),
            jnp.float32(0.1))


def test_each_switch_changes_the_loss_as_specified(active_bank):
  queue_index = jnp.asarray(np.random.default_rng(5).integers(-1, 64, 64))
  plain_loss, plain = _pcl_loss(step_lib.LossSwitches(), active_bank, queue_index)
  np.testing.assert_allclose(plain_loss, plain['loss_inst'] + plain['loss_proto'], rtol=1e-6)
  weighted_loss, weighted = _pcl_loss(step_lib.LossSwitches(proto_weight=0.25), active_bank,
                                      queue_index)
  np.testing.assert_allclose(weighted_loss, plain['loss_inst'] + 0.25 * plain['loss_proto'],
                             rtol=1e-6)
  _, smoothed = _pcl_loss(step_lib.LossSwitches(smooth_instance=True), active_bank, queue_index)
  assert float(smoothed['loss_inst']) > float(plain['loss_inst'])
  np.testing.assert_allclose(smoothed['loss_proto'], plain['loss_proto'], rtol=1e-6)
  _, reference = _pcl_loss(step_lib.LossSwitches(proto_columns='reference'), active_bank,
                           queue_index)
  assert float(reference['acc_proto']) <= float(plain['acc_proto'])
  assert float(reference['loss_proto']) != float(plain['loss_proto'])
  _, debiased = _pcl_loss(step_lib.LossSwitches(debias_prior=0.1), active_bank, queue_index)
  assert float(debiased['loss_inst']) != float(plain['loss_inst'])
  assert float(debiased['acc_inst']) == float(plain['acc_inst'])
  _, masked = _pcl_loss(step_lib.LossSwitches(mask_same_cluster_negatives=True), active_bank,
                        queue_index)
  assert float(masked['loss_inst']) < float(plain['loss_inst'])
  # Attraction: the same keys become InfoNCE's extra positives (wired to losses.info_nce).
  _, attracted = _pcl_loss(step_lib.LossSwitches(attract_same_cluster=True), active_bank,
                           queue_index)
  queries, keys, queue = _embeddings()
  same = step_lib.same_cluster_negatives(jnp.arange(8, 16), queue_index, active_bank)
  assert bool(same.any())
  expected, _ = losses.info_nce(queries, keys, queue, 0.2, attracted=same)
  np.testing.assert_allclose(attracted['loss_inst'], expected, rtol=1e-5)
  assert float(attracted['loss_inst']) > float(plain['loss_inst'])
  np.testing.assert_allclose(attracted['loss_proto'], plain['loss_proto'], rtol=1e-6)
  # ... weighted: the share, and graded weights over the levels.
  _, shared = _pcl_loss(step_lib.LossSwitches(attract_same_cluster=True, attract_share=0.5),
                        active_bank, queue_index)
  expected, _ = losses.info_nce(queries, keys, queue, 0.2, attracted=same, attract_share=0.5)
  np.testing.assert_allclose(shared['loss_inst'], expected, rtol=1e-5)
  _, graded = _pcl_loss(step_lib.LossSwitches(attract_same_cluster=True, mask_level='graded'),
                        active_bank, queue_index)
  fraction = step_lib.same_cluster_fraction(jnp.arange(8, 16), queue_index, active_bank)
  expected, _ = losses.info_nce(queries, keys, queue, 0.2, attracted=fraction)
  np.testing.assert_allclose(graded['loss_inst'], expected, rtol=1e-5)
  assert float(graded['loss_inst']) != float(attracted['loss_inst'])
  # With no queue row of a known sample, the mask removes nothing.
  _, unknown = _pcl_loss(step_lib.LossSwitches(mask_same_cluster_negatives=True), active_bank,
                         jnp.full((64,), -1))
  np.testing.assert_allclose(unknown['loss_inst'], plain['loss_inst'], rtol=1e-6)


# HCSC's instance selection (`pcl.select_negatives`), against numpy.


def _np_keep_probability(queue, index, levels, active):
  """Key by key: 1 - softmax over the level's prototypes of key . c / max(phi, 1e-3) at the
  query's cluster, clipped to [0, 0.999]; 1 at inactive levels."""
  keep = []
  for level, on in zip(levels, active):
    level_keep = np.ones((index.size, queue.shape[0]))
    if on:
      logits = queue.astype(np.float64) @ level['centroids'].T.astype(np.float64)
      logits /= np.maximum(level['concentration'], 1e-3)
      membership = np.exp(logits - logits.max(1, keepdims=True))
      membership /= membership.sum(1, keepdims=True)
      for row, sample in enumerate(index):
        level_keep[row] = np.clip(1 - membership[:, level['im2cluster'][sample]], 0, 0.999)
    keep.append(level_keep)
  return np.stack(keep)


def _selection_bank(active):
  rng = np.random.default_rng(6)
  levels = [{'centroids': rng.normal(size=(k, 16)).astype(np.float32),
             'im2cluster': rng.integers(0, k, 64),
             'concentration': rng.uniform(0.05, 0.5, k).astype(np.float32)} for k in (6, 3)]
  levels[1]['concentration'][0] = 0.0  # floored at 1e-3, as HCSC
  bank = bank_lib.prototype_bank(levels, 3, 6)  # slot 2 stays an unused level
  bank['active'] = jnp.asarray(active)
  return bank, levels


def test_negative_keep_probability_matches_numpy():
  bank, levels = _selection_bank([True, True, False])
  _, _, queue = _embeddings()
  index = np.arange(8, 16)
  keep = np.asarray(step_lib.negative_keep_probability(jnp.asarray(queue), jnp.asarray(index),
                                                       bank))
  want = _np_keep_probability(queue, index, levels + [None], [True, True, False])
  np.testing.assert_allclose(keep, want, rtol=1e-5, atol=1e-6)
  assert keep[:2].min() < 0.5 < keep[:2].max()  # some keys are likely dropped, some kept


def test_selected_negatives_are_drawn_with_the_keep_probability():
  bank, _ = _selection_bank([True, True, False])
  _, _, queue = _embeddings()
  index = jnp.arange(8, 16)
  draws = jax.vmap(lambda key: step_lib.select_negatives(queue, index, bank, key))(
      jax.random.split(jax.random.PRNGKey(0), 2000))
  keep = np.asarray(step_lib.negative_keep_probability(queue, index, bank))
  # 2000 draws: the standard error of a frequency is at most 0.011.
  np.testing.assert_allclose(np.asarray(draws).mean(0), keep, atol=0.06)
  assert np.asarray(draws)[:, 2].all()  # the inactive slot keeps every key


def test_selected_info_nce_averages_the_active_levels_numpy_info_nce():
  from test_losses import _np_info_nce  # pylint: disable=g-import-not-at-top
  queries, keys, queue = _embeddings()
  selected = np.random.default_rng(7).random((3, 8, 64)) < 0.7
  active = np.array([True, False, True])
  loss, acc = step_lib.selected_info_nce(queries, keys, queue, jnp.asarray(selected),
                                         jnp.asarray(active), 0.2, 0.1)
  per_level = [_np_info_nce(queries, keys, queue, 0.2, 0.1, excluded=~selected[level])
               for level in (0, 2)]
  np.testing.assert_allclose(loss, np.mean([l for l, _ in per_level]), rtol=1e-5)
  np.testing.assert_allclose(acc, np.mean([a for _, a in per_level]), rtol=1e-5)
  # Warm-up: no active level, and every slot keeps every key (select_negatives' inactive
  # slots): plain InfoNCE.
  loss, _ = step_lib.selected_info_nce(queries, keys, queue, jnp.ones((3, 8, 64), bool),
                                       jnp.zeros(3, bool), 0.2, 0.0)
  np.testing.assert_allclose(loss, losses.info_nce(queries, keys, queue, 0.2)[0], rtol=1e-6)


def test_select_negatives_switch_wires_the_selection_into_pcl_loss():
  bank, _ = _selection_bank([True, True, False])
  queue_index = jnp.full((64,), -1)  # the selection reads embeddings, not dataset indices
  _, plain = _pcl_loss(step_lib.LossSwitches(), bank, queue_index)
  _, selected = _pcl_loss(step_lib.LossSwitches(select_negatives=True), bank, queue_index)
  queries, keys, queue = _embeddings()
  drawn = step_lib.select_negatives(queue, jnp.arange(8, 16), bank,
                                    jax.random.fold_in(jax.random.PRNGKey(0), 1))
  expected, _ = step_lib.selected_info_nce(queries, keys, queue, drawn, bank['active'], 0.2, 0.0)
  np.testing.assert_allclose(selected['loss_inst'], expected, rtol=1e-6)
  assert float(selected['loss_inst']) < float(plain['loss_inst'])  # fewer negatives
  np.testing.assert_allclose(selected['loss_proto'], plain['loss_proto'], rtol=1e-6)
