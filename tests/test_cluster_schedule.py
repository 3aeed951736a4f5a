"""Tests for pcl_jax.cluster_schedule: parsing, the plateau detector, the schedule, resuming."""

import json

import ml_collections
import pytest

from pcl_jax import cluster_schedule
from pcl_jax.cluster_schedule import ClusterSchedule, SlidingWindow

DESCENDING = [3200, 2400, 1600, 800, 400]
ASCENDING = [2, 5, 10, 20, 33]


def _schedule(all_clusters=DESCENDING, **overrides):
  settings = dict(num_levels=3, mode='plateau', metric='acc_inst', window=3, min_delta=0.5,
                  init_threshold=0.0, threshold_step=1.0, patience=0, every=10)
  settings.update(overrides)
  return ClusterSchedule(all_clusters, **settings)


def _run(schedule, values, first_epoch=0):
  """Feeds acc_inst values, one per epoch; returns the decisions."""
  return [schedule.update(first_epoch + i, {'acc_inst': v, 'loss_inst': 1.0})
          for i, v in enumerate(values)]


def _actions(decisions):
  return [d.action for d in decisions]


# --- parse_cluster_list ---


@pytest.mark.parametrize('text, expected', [
    ('3200,2400,1600', [3200, 2400, 1600]),
    (' 2, 5 ,10 ', [2, 5, 10]),
    ('100', [100]),
])
def test_parse_cluster_list(text, expected):
  assert cluster_schedule.parse_cluster_list(text) == expected


@pytest.mark.parametrize('text, fragment', [
    ('', 'empty'),
    ('  ', 'empty'),
    ('3200,abc,1600', "'abc'"),
    ('3200,,1600', "''"),
    ('3200,2.5', "'2.5'"),
    ('3200,0', 'non-positive entry 0'),
    ('5,-2', 'non-positive entry -2'),
    ('3200,2400,2400', 'duplicate entry 2400'),
    ('3200,1600,2400', 'not monotone'),
    ('2,10,5,20', 'not monotone'),
])
def test_parse_cluster_list_errors(text, fragment):
  with pytest.raises(ValueError) as error:
    cluster_schedule.parse_cluster_list(text)
  message = str(error.value)
  assert 'schedule.all_clusters' in message
  assert fragment in message
  assert '\n' not in message


def test_parse_cluster_list_rejects_non_string():
  with pytest.raises(ValueError, match='schedule.all_clusters'):
    cluster_schedule.parse_cluster_list([3200, 1600])


def test_default_max_clusters():
  assert cluster_schedule.default_max_clusters([3200, 2400, 5]) == 3200
  assert cluster_schedule.default_max_clusters([2, 5, 10]) == 10


# --- SlidingWindow ---


def test_sliding_window_keeps_until_full():
  window = SlidingWindow(window=3, min_delta=0.5, init_threshold=0.0, threshold_step=1.0)
  assert [window.update(v) for v in (10.0, 10.0)] == ['keep', 'keep']
  assert window.update(10.0) == 'change'


def test_sliding_window_raises_threshold_while_improving():
  window = SlidingWindow(window=3, min_delta=0.5, init_threshold=0.0, threshold_step=1.0)
  assert [window.update(v) for v in (10.0, 11.0, 12.0, 13.0)] == [
      'keep', 'keep', 'raise_threshold', 'raise_threshold']
  assert window.threshold == 2.0


def test_sliding_window_keeps_below_threshold():
  window = SlidingWindow(window=2, min_delta=0.5, init_threshold=50.0, threshold_step=1.0)
  # A flat window below the threshold is no plateau worth acting on.
  assert [window.update(v) for v in (40.0, 40.0, 40.0)] == ['keep'] * 3
  assert window.threshold == 50.0


def test_sliding_window_reset_sets_threshold_from_value():
  window = SlidingWindow(window=2, min_delta=0.5, init_threshold=0.0, threshold_step=1.0)
  window.update(10.0)
  window.reset(10.0)
  assert window.values == [] and window.threshold == 10.0
  # Back at the old level: not above the threshold, so no new change.
  assert [window.update(v) for v in (10.0, 10.0)] == ['keep', 'keep']
  assert window.update(10.2) == 'change'  # mean 10.1 > 10, spread 0.2 < 0.5


def test_sliding_window_state_round_trip():
  window = SlidingWindow(window=3, min_delta=0.5, init_threshold=0.0, threshold_step=1.0)
  for v in (1.0, 2.0, 3.0):
    window.update(v)
  copy = SlidingWindow(window=3, min_delta=0.5, init_threshold=0.0, threshold_step=1.0)
  copy.load_state_dict(json.loads(json.dumps(window.state_dict())))
  assert copy.values == window.values and copy.threshold == window.threshold
  assert copy.update(3.1) == window.update(3.1)


def test_sliding_window_rejects_longer_saved_window():
  small = SlidingWindow(window=2, min_delta=0.5, init_threshold=0.0, threshold_step=1.0)
  with pytest.raises(ValueError, match='schedule.window'):
    small.load_state_dict({'values': [1.0, 2.0, 3.0], 'threshold': 0.0})


@pytest.mark.parametrize('kwargs, setting', [
    (dict(window=0), 'schedule.window'),
    (dict(min_delta=-1.0), 'schedule.min_delta'),
    (dict(threshold_step=-1.0), 'schedule.threshold_step'),
])
def test_sliding_window_bad_settings(kwargs, setting):
  settings = dict(window=3, min_delta=0.5, init_threshold=0.0, threshold_step=1.0)
  settings.update(kwargs)
  with pytest.raises(ValueError, match=setting):
    SlidingWindow(**settings)


# --- ClusterSchedule decisions ---


def test_initial_window_and_newest_k():
  schedule = _schedule()
  assert schedule.active == [3200, 2400, 1600]
  assert schedule.newest_k == 1600
  assert schedule.remaining == 2


def test_plateau_changes_and_resets_window():
  schedule = _schedule()
  decisions = _run(schedule, [10.0, 10.1, 10.2])
  assert _actions(decisions) == ['keep', 'keep', 'change']
  assert decisions[-1].message == 'Epoch 2: clusters changed -> [2400, 1600, 800]'
  assert decisions[-1].active == [2400, 1600, 800]
  assert decisions[-1].reason == 'plateau'
  assert decisions[0].message == ''
  assert schedule.active == [2400, 1600, 800]
  assert schedule.newest_k == 800
  assert schedule.last_change_epoch == 2
  # The threshold now comes from the metric at the change; the window starts empty.
  assert schedule.threshold == 10.2
  assert _actions(_run(schedule, [10.3, 10.3], first_epoch=3)) == ['keep', 'keep']


def test_still_improving_raises_threshold():
  schedule = _schedule()
  decisions = _run(schedule, [10.0, 12.0, 14.0, 16.0])
  assert _actions(decisions) == ['keep', 'keep', 'raise_threshold', 'raise_threshold']
  assert decisions[2].message == 'Epoch 2: threshold raised to 1.00'
  assert decisions[3].message == 'Epoch 3: threshold raised to 2.00'
  assert schedule.active == [3200, 2400, 1600]


def test_noisy_metric_never_changes():
  schedule = _schedule()
  # Oscillating by 2 points around 50: the spread never drops under min_delta=0.5.
  decisions = _run(schedule, [49.0, 51.0] * 10)
  assert 'change' not in _actions(decisions)
  assert schedule.active == [3200, 2400, 1600]


def test_improvement_then_plateau():
  schedule = _schedule(threshold_step=5.0)
  decisions = _run(schedule, [10.0, 20.0, 30.0, 30.1, 30.2, 30.2])
  # Raise to 5 at epoch 2 (mean 20); at epoch 3 the window (20, 30, 30.1) still spreads 10.1, so
  # raise to 10; at epoch 4 (30, 30.1, 30.2) it has plateaued above 10 -> change.
  assert _actions(decisions) == ['keep', 'keep', 'raise_threshold', 'raise_threshold', 'change',
                                 'keep']


def test_patience_forces_a_change():
  schedule = _schedule(patience=4)
  decisions = _run(schedule, [49.0, 51.0] * 5, first_epoch=20)
  actions = _actions(decisions)
  # Stage 1: epochs 20..23 -> change after epoch 23; stage 2: epochs 24..27 -> change after 27.
  assert [i + 20 for i, a in enumerate(actions) if a == 'change'] == [23, 27]
  assert decisions[3].reason == 'patience'
  assert decisions[3].message == 'Epoch 23: clusters changed -> [2400, 1600, 800]'
  assert schedule.active == [1600, 800, 400]


def test_patience_wins_over_threshold_raise():
  schedule = _schedule(patience=3)
  decisions = _run(schedule, [10.0, 12.0, 14.0])
  assert _actions(decisions) == ['keep', 'keep', 'change']
  assert decisions[-1].reason == 'patience'
  assert schedule.threshold == 14.0


def test_exhaustion_message_shown_once():
  schedule = _schedule(DESCENDING, num_levels=3, window=1, min_delta=0.5)
  # window=1: every epoch whose metric beats the threshold is a plateau (spread 0).
  decisions = _run(schedule, [10.0, 20.0, 30.0, 40.0, 50.0])
  assert _actions(decisions) == ['change', 'change', 'exhausted', 'keep', 'keep']
  assert decisions[2].message == 'Epoch 2: all_clusters exhausted, keeping [1600, 800, 400]'
  assert [d.message for d in decisions[3:]] == ['', '']
  assert schedule.active == [1600, 800, 400]
  assert all(d.active == [1600, 800, 400] for d in decisions[1:])


def test_single_window_is_exhausted_at_first_change():
  schedule = _schedule([10, 5], num_levels=2, window=1)
  assert _actions(_run(schedule, [1.0, 2.0])) == ['exhausted', 'keep']


def test_ascending_list():
  schedule = _schedule(ASCENDING, num_levels=2, window=2)
  assert schedule.active == [2, 5]
  assert schedule.newest_k == 5
  decisions = _run(schedule, [10.0, 10.0, 11.0, 11.0, 12.0, 12.0, 13.0, 13.0, 14.0, 14.0])
  changes = [d for d in decisions if d.action == 'change']
  assert [d.active for d in changes] == [[5, 10], [10, 20], [20, 33]]
  assert schedule.newest_k == 33
  assert _actions(decisions)[7:] == ['exhausted', 'keep', 'keep']


def test_fixed_mode_changes_every_n_epochs():
  schedule = _schedule(mode='fixed', every=3)
  # Fixed mode ignores the metric, so none needs to be logged.
  decisions = [schedule.update(epoch, {}) for epoch in range(10, 20)]
  assert [10 + i for i, d in enumerate(decisions) if d.action != 'keep'] == [12, 15, 18]
  assert _actions(decisions)[8] == 'exhausted'
  assert decisions[2].reason == 'fixed'
  assert decisions[2].message == 'Epoch 12: clusters changed -> [2400, 1600, 800]'
  assert schedule.active == [1600, 800, 400]


@pytest.mark.parametrize('all_clusters', [DESCENDING, ASCENDING])
def test_hierarchical_clustering_order_is_fine_to_coarse(all_clusters):
  schedule = _schedule(all_clusters, hierarchical=True)
  assert schedule.clustering_order() == sorted(schedule.active, reverse=True)
  # The newest level is still the last of the list order, whatever the clustering order.
  assert schedule.newest_k == all_clusters[2]


def test_flat_clustering_order_follows_the_list():
  assert _schedule(ASCENDING).clustering_order() == [2, 5, 10]


def test_missing_metric_names_the_setting():
  schedule = _schedule(metric='val_knn_top1')
  with pytest.raises(ValueError) as error:
    schedule.update(0, {'acc_inst': 1.0, 'loss_inst': 2.0, 'acc_proto': None})
  message = str(error.value)
  assert 'schedule.metric' in message and 'val_knn_top1' in message
  assert 'acc_inst, loss_inst' in message


def test_null_metric_is_an_error():
  with pytest.raises(ValueError, match='schedule.metric'):
    _schedule(metric='acc_proto').update(0, {'acc_proto': None, 'acc_inst': 1.0})


def test_nan_metric_is_an_error():
  with pytest.raises(ValueError, match='diverged'):
    _schedule().update(0, {'acc_inst': float('nan')})


def test_epochs_must_increase():
  schedule = _schedule()
  schedule.update(5, {'acc_inst': 1.0})
  with pytest.raises(ValueError, match='once per epoch'):
    schedule.update(5, {'acc_inst': 1.0})


# --- validation and construction ---


def test_validate_k_larger_than_n():
  schedule = _schedule([5000, 1000, 100])
  with pytest.raises(ValueError) as error:
    schedule.validate(1797)
  assert str(error.value) == ('schedule.all_clusters has k=5000 > N=1797 training samples; '
                              'use smaller entries')
  _schedule([1797, 1000, 100]).validate(1797)


@pytest.mark.parametrize('num_levels', [0, 6])
def test_bad_num_levels(num_levels):
  with pytest.raises(ValueError, match='schedule.num_levels'):
    _schedule(num_levels=num_levels)


@pytest.mark.parametrize('overrides, setting', [
    (dict(mode='cosine'), 'schedule.mode'),
    (dict(patience=-1), 'schedule.patience'),
    (dict(mode='fixed', every=0), 'schedule.every'),
])
def test_bad_settings(overrides, setting):
  with pytest.raises(ValueError, match=setting):
    _schedule(**overrides)


def test_constructor_checks_the_list():
  with pytest.raises(ValueError, match='not monotone'):
    _schedule([10, 30, 20])


def _config(**overrides):
  config = ml_collections.ConfigDict(dict(
      all_clusters='3200,2400,1600,800', num_levels=2, mode='plateau', metric='acc_inst',
      window=4, min_delta=0.25, init_threshold=1.5, threshold_step=2.0, patience=7, every=10))
  config.update(overrides)
  return config


def test_from_config():
  schedule = ClusterSchedule.from_config(_config(), hierarchical=True)
  assert schedule.all_clusters == [3200, 2400, 1600, 800]
  assert schedule.active == [3200, 2400]
  assert (schedule.mode, schedule.metric, schedule.patience, schedule.every) == (
      'plateau', 'acc_inst', 7, 10)
  assert schedule.threshold == 1.5
  assert schedule.hierarchical


def test_from_config_unknown_mode():
  with pytest.raises(ValueError, match="schedule.mode 'steps' is unknown"):
    ClusterSchedule.from_config(_config(mode='steps'))


def test_from_config_bad_list():
  with pytest.raises(ValueError, match='schedule.all_clusters'):
    ClusterSchedule.from_config(_config(all_clusters='800,1600,1200'))


# --- resuming ---

STREAM = [10.0, 12.0, 14.0, 14.1, 14.2, 14.2, 13.0, 14.5, 16.0, 16.1, 16.1, 16.2, 16.2, 16.3,
          49.0, 51.0, 49.0, 51.0, 50.0, 50.1, 50.0, 50.2, 50.3, 50.3]


@pytest.mark.parametrize('overrides', [
    dict(),
    dict(patience=5),
    dict(mode='fixed', every=4),
    dict(num_levels=4, window=2),
])
@pytest.mark.parametrize('split', [1, 5, 11, 17])
def test_state_dict_round_trip_gives_identical_decisions(overrides, split):
  uninterrupted = _schedule(**overrides)
  expected = _run(uninterrupted, STREAM, first_epoch=3)

  first = _schedule(**overrides)
  before = _run(first, STREAM[:split], first_epoch=3)
  saved = json.dumps(first.state_dict())  # through JSON, as a checkpoint stores it
  resumed = _schedule(**overrides)
  resumed.load_state_dict(json.loads(saved))
  after = _run(resumed, STREAM[split:], first_epoch=3 + split)

  assert before + after == expected
  assert resumed.state_dict() == uninterrupted.state_dict()


def test_state_dict_round_trip_after_exhaustion():
  schedule = _schedule([10, 5], num_levels=2, window=1)
  _run(schedule, [1.0])
  resumed = _schedule([10, 5], num_levels=2, window=1)
  resumed.load_state_dict(json.loads(json.dumps(schedule.state_dict())))
  # The exhausted message is not repeated after a resume.
  assert resumed.update(1, {'acc_inst': 2.0}) == cluster_schedule.Decision('keep', '', [10, 5])


def test_state_dict_rejects_other_schedule():
  saved = _schedule().state_dict()
  with pytest.raises(ValueError, match='same schedule settings'):
    _schedule(ASCENDING).load_state_dict(saved)
  with pytest.raises(ValueError, match='same schedule settings'):
    _schedule(num_levels=2).load_state_dict(saved)


def test_state_dict_rejects_other_version():
  saved = _schedule().state_dict()
  saved['version'] = 99
  with pytest.raises(ValueError, match='version'):
    _schedule().load_state_dict(saved)
