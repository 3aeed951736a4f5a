"""InfoNCE's forms and ProtoNCE against independent numpy / torch references; which queue keys
the forms act on (same cluster, HCSC's selection) against numpy; smoothing_factor."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from pcl_jax.clustering import bank as bank_lib
from pcl_jax import losses


def _unit(rng, shape):
  x = rng.normal(size=shape).astype(np.float32)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _np_log_softmax(logits):
  shifted = logits - logits.max(axis=1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def test_info_nce_matches_numpy():
  rng = np.random.default_rng(0)
  q, k, queue = _unit(rng, (8, 16)), _unit(rng, (8, 16)), _unit(rng, (32, 16))
  loss, acc = losses.info_nce(q, k, queue, 0.2)
  logits = np.concatenate([(q * k).sum(1, keepdims=True), q @ queue.T], axis=1) / 0.2
  expected = -_np_log_softmax(logits.astype(np.float64))[:, 0].mean()
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(acc, 100.0 * np.mean(logits.argmax(1) == 0))


def test_info_nce_perfect_keys_give_full_accuracy():
  rng = np.random.default_rng(1)
  q = _unit(rng, (4, 8))
  queue = -np.repeat(q[:1], 16, axis=0)
  _, acc = losses.info_nce(q, q, queue, 0.07)
  assert float(acc) == 100.0


def _torch_reference(q, index, im2cluster, prototypes, concentration, column_set, smoothing):
  """ProtoNCE via torch's own label-smoothed cross-entropy over the chosen prototype columns."""
  columns = sorted(column_set)
  positives = im2cluster[index]
  logits = (q.astype(np.float64) @ prototypes[columns].T.astype(np.float64)
            / concentration[columns][None, :])
  target = np.array([columns.index(p) for p in positives])
  loss = torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(target),
                                           label_smoothing=smoothing).item()
  return loss, 100.0 * np.mean(logits.argmax(1) == target)


def _level(rng, num_samples, k, max_k, dim):
  prototypes = np.zeros((max_k, dim), np.float32)
  prototypes[:k] = _unit(rng, (k, dim))
  concentration = np.ones(max_k, np.float32)
  concentration[:k] = rng.uniform(0.05, 0.5, size=k)
  valid = np.arange(max_k) < k
  im2cluster = rng.integers(0, k, size=num_samples).astype(np.int32)
  return prototypes, concentration, valid, im2cluster


@pytest.mark.parametrize('k,smoothing', [(2, 0.0), (2, 0.2), (10, 0.0), (10, 0.2), (40, 0.1)])
def test_proto_nce_all_prototypes_when_k_small(k, smoothing):
  rng = np.random.default_rng(k)
  batch, num_negatives, max_k = 8, 32, 64
  prototypes, concentration, valid, im2cluster = _level(rng, 100, k, max_k, 16)
  q, index = _unit(rng, (batch, 16)), rng.choice(100, batch, replace=False)
  loss, acc = losses.proto_nce(q, index, im2cluster, prototypes, concentration, valid,
                               jax.random.PRNGKey(0), num_negatives, smoothing)
  expected_loss, expected_acc = _torch_reference(q, index, im2cluster, prototypes, concentration,
                                                 set(range(k)), smoothing)
  np.testing.assert_allclose(loss, expected_loss, rtol=1e-4)
  np.testing.assert_allclose(acc, expected_acc)


@pytest.mark.parametrize('smoothing', [0.0, 0.2])
def test_proto_nce_samples_negatives_when_k_exceeds_batch_plus_r(smoothing):
  rng = np.random.default_rng(7)
  batch, num_negatives, k, max_k = 8, 16, 100, 128
  prototypes, concentration, valid, im2cluster = _level(rng, 300, k, max_k, 16)
  im2cluster[:4] = 3  # two samples share prototype 3: it must appear once, not as a negative
  q, index = _unit(rng, (batch, 16)), np.array([0, 1, 2, 3, 10, 20, 30, 40])
  key = jax.random.PRNGKey(3)
  columns, column_valid = losses.select_prototype_columns(
      jnp.asarray(im2cluster[index]), jnp.asarray(valid), key, num_negatives)
  chosen = set(np.asarray(columns)[np.asarray(column_valid)].tolist())
  positives = set(im2cluster[index].tolist())
  assert positives <= chosen
  assert len(chosen) == len(positives) + num_negatives
  assert all(c < k for c in chosen)
  assert len(set(np.asarray(columns).tolist())) == len(columns)  # no duplicate columns
  loss, acc = losses.proto_nce(q, index, im2cluster, prototypes, concentration, valid, key,
                               num_negatives, smoothing)
  expected_loss, expected_acc = _torch_reference(q, index, im2cluster, prototypes, concentration,
                                                 chosen, smoothing)
  np.testing.assert_allclose(loss, expected_loss, rtol=1e-4)
  np.testing.assert_allclose(acc, expected_acc)


def test_negative_sample_is_uniform_without_replacement():
  valid = jnp.arange(40) < 30
  positives = jnp.array([0, 0, 1, 2], jnp.int32)
  counts = np.zeros(40)
  select = jax.jit(lambda key: losses.select_prototype_columns(positives, valid, key, 6))
  for seed in range(400):
    columns, column_valid = select(jax.random.PRNGKey(seed))
    chosen = np.asarray(columns)[np.asarray(column_valid)]
    assert len(set(chosen.tolist())) == len(chosen) == 3 + 6
    counts[chosen] += 1
  assert counts[:3].min() == 400 and counts[30:].max() == 0
  # Each of the 27 negatives is drawn with probability 6/27: 400 * 6/27 = 88.9 on average.
  assert abs(counts[3:30].mean() - 400 * 6 / 27) < 1e-6
  assert counts[3:30].min() > 50 and counts[3:30].max() < 130


def test_proto_nce_gradient_is_finite_with_padding():
  rng = np.random.default_rng(3)
  prototypes, concentration, valid, im2cluster = _level(rng, 50, 5, 64, 8)
  q, index = _unit(rng, (4, 8)), np.arange(4)
  grad = jax.grad(lambda q: losses.proto_nce(q, index, im2cluster, prototypes, concentration,
                                             valid, jax.random.PRNGKey(0), 8, 0.2)[0])(q)
  assert np.all(np.isfinite(grad))


@pytest.mark.parametrize('k,expected', [(3200, 0.0), (0, 0.2), (800, math.sqrt(0.75) * 0.2),
                                        (2, math.sqrt(3198 / 3200) * 0.2)])
def test_smoothing_factor_is_the_notes_formula(k, expected):
  assert losses.smoothing_factor(k, 3200) == pytest.approx(expected)


def test_smoothing_factor_caps_and_rejects_bad_max():
  assert losses.smoothing_factor(1, 10, cap=0.1) <= 0.1
  with pytest.raises(ValueError, match='max_clusters'):
    losses.smoothing_factor(5, 0)


# ------------------------------------------------------------------------------------------------
# InfoNCE's forms (pcl.instance_loss), each against an independent numpy reference.


def _np_info_nce(q, k, queue, temperature, smoothing, excluded=None, attracted=None, share=0.0):
  """Row by row: the surviving columns (`excluded` keys dropped), then the cross-entropy against
  the positives (the key, and the `attracted` keys with their weights: Huynh et al.'s
  attraction), the attracted keys rescaled to `share` of the target when it is set,
  label-smoothed uniformly over the surviving columns (torch's label smoothing for one
  positive)."""
  num_keys = queue.shape[0]
  excluded = np.zeros((q.shape[0], num_keys), bool) if excluded is None else excluded
  attracted = np.zeros((q.shape[0], num_keys)) if attracted is None else attracted
  losses_, hits = [], []
  for row in range(q.shape[0]):
    kept = ~excluded[row]
    logits = np.concatenate([[q[row] @ k[row]],
                             queue[kept].astype(np.float64) @ q[row]]) / temperature
    log_probs = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
    weights = np.concatenate([[1.0], attracted[row][kept].astype(np.float64)])
    if share and weights[1:].sum() > 0:
      weights = np.concatenate([[1.0 - share], share * weights[1:] / weights[1:].sum()])
    target = weights / weights.sum()
    losses_.append(-(1.0 - smoothing) * (target * log_probs).sum()
                   - smoothing * log_probs.mean())
    hits.append(target[logits.argmax()] > 0)
  return np.mean(losses_), 100.0 * np.mean(hits)


@pytest.mark.parametrize('smoothing', [0.0, 0.15])
def test_masked_info_nce_with_and_without_smoothing_matches_numpy(smoothing):
  rng = np.random.default_rng(3)
  q, k, queue = _unit(rng, (6, 8)), _unit(rng, (6, 8)), _unit(rng, (20, 8))
  excluded = rng.random((6, 20)) < 0.4
  excluded[0] = True  # a row with no negative left: only the positive column
  loss, acc = losses.masked_info_nce(q, k, queue, 0.2, jnp.asarray(excluded),
                                     smoothing=smoothing)
  expected_loss, expected_acc = _np_info_nce(q, k, queue, 0.2, smoothing, excluded=excluded)
  np.testing.assert_allclose(loss, expected_loss, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(acc, expected_acc)


@pytest.mark.parametrize('smoothing', [0.0, 0.15])
def test_smoothed_info_nce_matches_numpy(smoothing):
  """`pcl.infonce.smoothed`: ProtoNCE's epsilon over every column (0: the published form)."""
  rng = np.random.default_rng(2)
  q, k, queue = _unit(rng, (6, 8)), _unit(rng, (6, 8)), _unit(rng, (20, 8))
  loss, acc = losses.info_nce(q, k, queue, 0.2, smoothing=jnp.float32(smoothing))
  expected_loss, expected_acc = _np_info_nce(q, k, queue, 0.2, smoothing)
  np.testing.assert_allclose(loss, expected_loss, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(acc, expected_acc)


@pytest.mark.parametrize('smoothing', [0.0, 0.1])
def test_attract_info_nce_matches_numpy(smoothing):
  rng = np.random.default_rng(5)
  q, k, queue = _unit(rng, (6, 8)), _unit(rng, (6, 8)), _unit(rng, (20, 8))
  attracted = rng.random((6, 20)) < 0.3
  attracted[0] = False  # a row with the key as its only positive: plain InfoNCE
  queue[3] = q[1]  # row 1's top-1 is an attracted key: counted correct
  attracted[1, 3] = True
  loss, acc = losses.attract_info_nce(q, k, queue, 0.2, jnp.asarray(attracted),
                                      smoothing=smoothing)
  expected_loss, expected_acc = _np_info_nce(q, k, queue, 0.2, smoothing, attracted=attracted)
  np.testing.assert_allclose(loss, expected_loss, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(acc, expected_acc)
  plain_row, _ = losses.info_nce(q[:1], k[:1], queue, 0.2, smoothing=smoothing)
  attracted_row, _ = losses.attract_info_nce(q[:1], k[:1], queue, 0.2,
                                             jnp.asarray(attracted[:1]), smoothing=smoothing)
  np.testing.assert_allclose(attracted_row, plain_row, rtol=1e-6)


@pytest.mark.parametrize('share, graded', [(0.5, False), (0.0, True), (0.3, True)])
def test_attract_info_nce_with_weighted_attraction_matches_numpy(share, graded):
  """`pcl.attract.share` (the attracted keys' share of the target) and graded weights
  (`pcl.attract.level=graded`: fractions of levels), alone and together."""
  rng = np.random.default_rng(6)
  q, k, queue = _unit(rng, (6, 8)), _unit(rng, (6, 8)), _unit(rng, (20, 8))
  attracted = (rng.random((6, 20)) < 0.3) * (rng.integers(1, 4, (6, 20)) / 3 if graded else 1.0)
  attracted[0] = 0  # no attracted key: plain InfoNCE whatever the share
  loss, acc = losses.attract_info_nce(q, k, queue, 0.2, jnp.asarray(attracted), share=share,
                                      smoothing=0.1)
  expected_loss, expected_acc = _np_info_nce(q, k, queue, 0.2, 0.1, attracted=attracted,
                                             share=share)
  np.testing.assert_allclose(loss, expected_loss, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(acc, expected_acc)
  target = np.asarray(losses.attraction_target(jnp.asarray(attracted), share))
  np.testing.assert_allclose(target.sum(-1), 1.0, rtol=1e-6)
  np.testing.assert_array_equal(target[0], np.eye(21)[0])
  if share:
    has_attracted = attracted.sum(-1) > 0
    np.testing.assert_allclose(target[has_attracted, 0], 1.0 - share, rtol=1e-6)


def test_excluding_a_hard_negative_raises_accuracy():
  rng = np.random.default_rng(4)
  q = _unit(rng, (1, 8))
  queue = np.concatenate([q, -q, -q]).astype(np.float32)  # row 0 equals the query
  k = _unit(rng, (1, 8))
  _, acc = losses.info_nce(q, k, queue, 0.2)
  _, acc_masked = losses.masked_info_nce(q, k, queue, 0.2, jnp.asarray([[True, False, False]]))
  assert float(acc) == 0.0 and float(acc_masked) == 100.0


def _np_debiased(q, k, queue, temperature, prior):
  """Chuang et al. (2020), eq. 7, written directly in float64 (no shift)."""
  out = []
  for row in range(q.shape[0]):
    pos = np.exp(float(q[row] @ k[row]) / temperature)
    negatives = np.exp(queue.astype(np.float64) @ q[row] / temperature)
    n = len(negatives)
    estimate = max((negatives.sum() - prior * n * pos) / (1 - prior),
                   n * np.exp(-1 / temperature))
    out.append(-np.log(pos / (pos + estimate)))
  return np.mean(out)


@pytest.mark.parametrize('prior', [0.1, 0.5])
def test_debiased_info_nce_matches_numpy(prior):
  rng = np.random.default_rng(5)
  q, queue = _unit(rng, (7, 8)), _unit(rng, (24, 8))
  # Positives near their queries; not so near that every row's estimate takes its floor.
  k = _unit(rng, (7, 8)) + q
  k = (k / np.linalg.norm(k, axis=1, keepdims=True)).astype(np.float32)
  loss, acc = losses.debiased_info_nce(q, k, queue, 0.2, prior=prior)
  np.testing.assert_allclose(loss, _np_debiased(q, k, queue, 0.2, prior), rtol=1e-5)
  _, plain_acc = losses.info_nce(q, k, queue, 0.2)
  assert float(acc) == float(plain_acc)  # the estimator changes the loss, not the ranking


def test_debiased_info_nce_uses_its_floor_when_the_estimate_goes_negative():
  q = np.array([[1.0, 0.0]], np.float32)
  k = q.copy()  # the positive as close as it can be
  queue = np.array([[-1.0, 0.0]] * 4, np.float32)  # negatives as far as they can be
  loss, _ = losses.debiased_info_nce(q, k, queue, 0.5, prior=0.5)
  pos, floor = np.exp(2.0), 4 * np.exp(-2.0)
  np.testing.assert_allclose(loss, -np.log(pos / (pos + floor)), rtol=1e-5)
  assert np.isfinite(jax.grad(lambda x: losses.debiased_info_nce(x, k, queue, 0.5,
                                                                  prior=0.5)[0])(q)).all()


def _np_reference_proto_nce(q, index, im2cluster, prototypes, concentration, k, negatives,
                            smoothing):
  """The official builder's ProtoNCE for one level, given its sampled negative prototypes."""
  positives = im2cluster[index]
  columns = np.concatenate([positives, negatives])
  logits = (q.astype(np.float64) @ prototypes[columns].T.astype(np.float64)
            / concentration[columns][None, :])
  target = np.arange(len(index))
  loss = torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(target),
                                           label_smoothing=smoothing).item()
  return loss, 100.0 * np.mean(logits.argmax(1) == target)


@pytest.mark.parametrize('k,num_negatives', [(6, 16), (40, 8)])
@pytest.mark.parametrize('smoothing', [0.0, 0.1])
def test_reference_columns_match_the_official_code(k, num_negatives, smoothing):
  rng = np.random.default_rng(6)
  batch, max_k, dim = 8, 48, 8
  prototypes, concentration, valid, im2cluster = _level(rng, 30, k, max_k, dim)
  index = rng.choice(30, batch, replace=False)
  q = _unit(rng, (batch, dim))
  key = jax.random.PRNGKey(7)
  loss, acc = losses.proto_nce(q, index, im2cluster, prototypes, concentration, valid, key,
                               num_negatives, jnp.float32(smoothing), columns='reference')
  columns, column_valid, target = losses.reference_prototype_columns(
      jnp.asarray(im2cluster[index]), jnp.asarray(valid), key, num_negatives)
  negatives = np.asarray(columns[batch:])[np.asarray(column_valid[batch:])]
  # The sample: distinct non-positive prototypes, min(r, available) of them.
  positive_set = set(im2cluster[index].tolist())
  assert len(set(negatives.tolist())) == len(negatives)
  assert not set(negatives.tolist()) & positive_set and (negatives < k).all()
  assert len(negatives) == min(num_negatives, k - len(positive_set))
  np.testing.assert_array_equal(target, np.arange(batch))
  expected_loss, expected_acc = _np_reference_proto_nce(
      q, index, im2cluster, prototypes, concentration, k, negatives, smoothing)
  np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
  np.testing.assert_allclose(acc, expected_acc)


def test_reference_columns_count_a_shared_prototype_wrong_for_all_but_its_first_sample():
  q = np.array([[1.0, 0.0]] * 3, np.float32)
  prototypes = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
  im2cluster = np.array([0, 0, 0], np.int32)  # one prototype for all three samples
  args = (q, np.arange(3), im2cluster, prototypes, np.ones(2, np.float32),
          np.ones(2, bool), jax.random.PRNGKey(0), 4, jnp.float32(0.0))
  _, acc_unique = losses.proto_nce(*args)
  _, acc_reference = losses.proto_nce(*args, columns='reference')
  assert float(acc_unique) == 100.0
  np.testing.assert_allclose(acc_reference, 100.0 / 3)


# ------------------------------------------------------------------------------------------------
# The queue keys the forms act on: by the clusters of their samples, by HCSC's selection.


def _bank(rng, num_samples, sizes, active):
  """A prototype bank whose levels have `sizes` prototypes, `active` marking the live ones."""
  levels = [{'centroids': rng.normal(size=(k, 4)).astype(np.float32),
             'im2cluster': rng.integers(0, k, num_samples),
             'concentration': np.ones(k, np.float32)} for k in sizes]
  bank = bank_lib.prototype_bank(levels, len(sizes), max(sizes))
  bank['active'] = jnp.asarray(active)
  return bank, levels


@pytest.mark.parametrize('level, expected_level', [('finest', 0), ('coarsest', 2)])
def test_same_cluster_matches_numpy_at_the_chosen_active_level(level, expected_level):
  rng = np.random.default_rng(0)
  # Active: k=5 (finest) and k=3 (coarsest); the inactive k=12 level is neither.
  bank, levels = _bank(rng, 50, (5, 12, 3), [True, False, True])
  index = rng.integers(0, 50, 6)
  queue_index = rng.integers(-1, 50, 20)
  same = np.asarray(losses.same_cluster(jnp.asarray(index), jnp.asarray(queue_index), bank,
                                        level))
  clusters = levels[expected_level]['im2cluster']
  expected = np.array([[j >= 0 and clusters[j] == clusters[i] for j in queue_index]
                       for i in index])
  np.testing.assert_array_equal(same, expected.astype(np.float32))


def test_same_cluster_graded_is_the_fraction_of_active_levels_in_numpy():
  rng = np.random.default_rng(1)
  bank, levels = _bank(rng, 50, (5, 12, 3), [True, False, True])
  index = rng.integers(0, 50, 6)
  queue_index = rng.integers(-1, 50, 20)
  fraction = np.asarray(losses.same_cluster(jnp.asarray(index), jnp.asarray(queue_index), bank,
                                            'graded'))
  active = [levels[0]['im2cluster'], levels[2]['im2cluster']]
  expected = np.array([[np.mean([c[j] == c[i] for c in active]) if j >= 0 else 0.0
                        for j in queue_index] for i in index])
  np.testing.assert_allclose(fraction, expected)
  assert {0.0, 0.5, 1.0} >= set(np.unique(fraction)) and (fraction == 0.5).any()


@pytest.mark.parametrize('level', ['finest', 'coarsest', 'graded'])
def test_no_key_shares_a_cluster_during_warm_up(level):
  rng = np.random.default_rng(1)
  bank, _ = _bank(rng, 10, (2, 2), [False, False])
  assert not np.asarray(losses.same_cluster(jnp.arange(4), jnp.arange(8), bank, level)).any()


def _embeddings(seed=4):
  """Unit queries [8, 16], keys near them, and a queue [64, 16]."""
  rng = np.random.default_rng(seed)
  queries, queue = _unit(rng, (8, 16)), _unit(rng, (64, 16))
  keys = _unit(rng, (8, 16)) + queries
  return queries, keys / np.linalg.norm(keys, axis=-1, keepdims=True), queue


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


def _selection_bank():
  """Levels of 6 and 3 prototypes (one concentration 0: floored at 1e-3, as HCSC) and a third,
  unused level slot."""
  rng = np.random.default_rng(6)
  levels = [{'centroids': rng.normal(size=(k, 16)).astype(np.float32),
             'im2cluster': rng.integers(0, k, 64),
             'concentration': rng.uniform(0.05, 0.5, k).astype(np.float32)} for k in (6, 3)]
  levels[1]['concentration'][0] = 0.0
  bank = bank_lib.prototype_bank(levels, 3, 6)
  return bank, levels


def test_negative_keep_probability_matches_numpy():
  bank, levels = _selection_bank()
  _, _, queue = _embeddings()
  index = np.arange(8, 16)
  keep = np.asarray(losses.negative_keep_probability(jnp.asarray(queue), jnp.asarray(index),
                                                     bank))
  want = _np_keep_probability(queue, index, levels + [None], [True, True, False])
  np.testing.assert_allclose(keep, want, rtol=1e-5, atol=1e-6)
  assert keep[:2].min() < 0.5 < keep[:2].max()  # some keys are likely dropped, some kept


def test_selected_negatives_are_drawn_with_the_keep_probability():
  bank, _ = _selection_bank()
  _, _, queue = _embeddings()
  index = jnp.arange(8, 16)
  draws = jax.vmap(lambda key: losses.select_negatives(queue, index, bank, key))(
      jax.random.split(jax.random.PRNGKey(0), 2000))
  keep = np.asarray(losses.negative_keep_probability(queue, index, bank))
  # 2000 draws: the standard error of a frequency is at most 0.011.
  np.testing.assert_allclose(np.asarray(draws).mean(0), keep, atol=0.06)
  assert np.asarray(draws)[:, 2].all()  # the inactive slot keeps every key


def test_selected_info_nce_averages_the_active_levels_numpy_info_nce():
  queries, keys, queue = _embeddings()
  selected = np.random.default_rng(7).random((3, 8, 64)) < 0.7
  active = np.array([True, False, True])
  loss, acc = losses.selected_info_nce(queries, keys, queue, 0.2, jnp.asarray(selected),
                                       jnp.asarray(active), smoothing=0.1)
  per_level = [_np_info_nce(queries, keys, queue, 0.2, 0.1, excluded=~selected[level])
               for level in (0, 2)]
  np.testing.assert_allclose(loss, np.mean([l for l, _ in per_level]), rtol=1e-5)
  np.testing.assert_allclose(acc, np.mean([a for _, a in per_level]), rtol=1e-5)
  # Warm-up: no active level, and every slot keeps every key (select_negatives' inactive
  # slots): plain InfoNCE.
  loss, _ = losses.selected_info_nce(queries, keys, queue, 0.2, jnp.ones((3, 8, 64), bool),
                                     jnp.zeros(3, bool))
  np.testing.assert_allclose(loss, losses.info_nce(queries, keys, queue, 0.2)[0], rtol=1e-6)
