"""The cluster-count schedule: which k-means levels are active, and when they change.

This module owns the notes' schedule (DESIGN.md section 1, "Cluster-count schedule"): parsing
`schedule.all_clusters`, the sliding-window plateau detector over a per-epoch metric, and the
controller that slides a window of `num_levels` consecutive cluster counts along the list. It is
host-side pure Python (no jax, no numpy): it never touches parameters, features, clustering or
logging; it only returns decisions and messages for the trainer to act on and print. Every
controller has `state_dict()/load_state_dict()` with JSON-serialisable state, so a run resumed
from a checkpoint makes exactly the decisions of an uninterrupted one.

Typical use in the trainer, once per epoch in which prototypes were in use::

  schedule = ClusterSchedule.from_config(config.schedule,
                                         config.clustering.levels == 'hierarchical')
  schedule.validate(num_train_samples)
  ...
  decision = schedule.update(epoch, epoch_metrics)
  if decision.message:
    logging.info(decision.message)
"""

import dataclasses
import math
from typing import Any, Dict, List, Mapping, Optional, Sequence

CHANGE = 'change'
RAISE_THRESHOLD = 'raise_threshold'
KEEP = 'keep'
EXHAUSTED = 'exhausted'

MODES = ('plateau', 'fixed')

# Bumped when the layout of ClusterSchedule.state_dict() changes.
_STATE_VERSION = 1

_LIST_HINT = "give a comma-separated list of distinct positive integers, e.g. '3200,2400,1600'"


def _check_cluster_list(clusters: Sequence[int]) -> None:
  """Raises ValueError unless `clusters` is non-empty, positive, distinct and strictly monotone."""
  if not clusters:
    raise ValueError(f'schedule.all_clusters is empty; {_LIST_HINT}')
  for k in clusters:
    if k <= 0:
      raise ValueError(f'schedule.all_clusters has non-positive entry {k}; {_LIST_HINT}')
  seen = set()
  for k in clusters:
    if k in seen:
      raise ValueError(f'schedule.all_clusters has duplicate entry {k}; {_LIST_HINT}')
    seen.add(k)
  pairs = list(zip(clusters[:-1], clusters[1:]))
  decreasing = all(a > b for a, b in pairs)
  increasing = all(a < b for a, b in pairs)
  if not (decreasing or increasing):
    raise ValueError(
        f'schedule.all_clusters {list(clusters)} is not monotone; order it strictly decreasing '
        '(fine->coarse, e.g. 3200,2400,1600) or strictly increasing (e.g. 2,5,10)')


def parse_cluster_list(text: str) -> List[int]:
  """Parses `schedule.all_clusters`, a comma string such as '3200,2400,1600'.

  Args:
    text: comma-separated integers; spaces around entries are allowed.
  Returns:
    The cluster counts in the given order.
  Raises:
    ValueError: one line naming `schedule.all_clusters` and the fix, when the string is empty,
      an entry is not an integer or not positive, an entry repeats, or the list is not strictly
      decreasing or strictly increasing.
  """
  if not isinstance(text, str):
    raise ValueError(
        f'schedule.all_clusters must be a comma string, got {type(text).__name__} {text!r}; '
        f'{_LIST_HINT}')
  if not text.strip():
    raise ValueError(f'schedule.all_clusters is empty; {_LIST_HINT}')
  clusters = []
  for entry in text.split(','):
    try:
      clusters.append(int(entry.strip()))
    except ValueError:
      raise ValueError(
          f'schedule.all_clusters entry {entry.strip()!r} in {text!r} is not an integer; '
          f'{_LIST_HINT}') from None
  _check_cluster_list(clusters)
  return clusters


def default_max_clusters(all_clusters: Sequence[int]) -> int:
  """The `max_clusters` of the smoothing formula when `pcl.max_clusters` is 0: the largest k."""
  return max(all_clusters)


class SlidingWindow:
  """Plateau detector over the last `window` values of a per-epoch metric (the notes' design).

  After each epoch, with the window full (W values):
  - mean > threshold and max - min < min_delta (it stopped improving): 'change';
  - mean > threshold and max - min >= min_delta (still improving): 'raise_threshold', and the
    threshold grows by `threshold_step`; the window keeps sliding, it is not cleared;
  - otherwise (not full, or mean <= threshold): 'keep'.
  """

  def __init__(self, window: int, min_delta: float, init_threshold: float,
               threshold_step: float):
    if int(window) != window or window < 1:
      raise ValueError(f'schedule.window must be an integer >= 1, got {window}')
    if min_delta < 0:
      raise ValueError(f'schedule.min_delta must be >= 0, got {min_delta}')
    if threshold_step < 0:
      raise ValueError(f'schedule.threshold_step must be >= 0, got {threshold_step}')
    self.window = int(window)
    self.min_delta = float(min_delta)
    self.threshold_step = float(threshold_step)
    self.threshold = float(init_threshold)
    self.values: List[float] = []

  @property
  def full(self) -> bool:
    return len(self.values) == self.window

  def update(self, value: float) -> str:
    """Adds one epoch's metric; returns 'change', 'raise_threshold' or 'keep'."""
    self.values.append(float(value))
    if len(self.values) > self.window:
      del self.values[0]
    if not self.full:
      return KEEP
    mean = sum(self.values) / len(self.values)
    if mean <= self.threshold:
      return KEEP
    if max(self.values) - min(self.values) < self.min_delta:
      return CHANGE
    self.threshold += self.threshold_step
    return RAISE_THRESHOLD

  def reset(self, value: float) -> None:
    """Starts a new stage: empty window, threshold = the current metric value.

    The new stage must then climb back above the level at which the old one plateaued before
    it can change again (the notes' `sliding_window.reset`).
    """
    self.values = []
    self.threshold = float(value)

  def state_dict(self) -> Dict[str, Any]:
    return {'values': list(self.values), 'threshold': self.threshold}

  def load_state_dict(self, state: Mapping[str, Any]) -> None:
    values = [float(v) for v in state['values']]
    if len(values) > self.window:
      raise ValueError(
          f'saved plateau window holds {len(values)} values but schedule.window is '
          f'{self.window}; resume with the same schedule.window or start a new workdir')
    self.values = values
    self.threshold = float(state['threshold'])


@dataclasses.dataclass(frozen=True)
class Decision:
  """What the schedule decided after one epoch.

  Attributes:
    action: 'change' (the active levels moved), 'raise_threshold', 'keep', or 'exhausted' (a
      change was due but all_clusters has no next entry; returned once, then 'keep').
    message: the line to log, or '' when there is nothing to say.
    active: the active cluster counts for the next epoch.
    reason: why a change was due: 'plateau', 'patience' or 'fixed'; '' otherwise.
  """
  action: str
  message: str
  active: List[int]
  reason: str = ''


class ClusterSchedule:
  """Slides a window of `num_levels` consecutive entries along `all_clusters`.

  The active levels start as the first `num_levels` entries. A change drops the first active
  level and appends the next entry of the list. In `plateau` mode a change is due when the
  `SlidingWindow` over `metrics[metric]` says so, or when the stage has lasted `patience` epochs
  (0: no cap); in `fixed` mode every `every` epochs. A stage's length counts the epochs passed to
  `update` since the stage began (the first call, or the epoch after the last change), so the
  first stage is measured from the first epoch with prototypes, not from epoch 0. Once a change
  is due and the list has no next entry, the last window is kept for good: one 'exhausted'
  decision with a message, then silent 'keep's.
  """

  def __init__(self, all_clusters: Sequence[int], num_levels: int, mode: str = 'plateau',
               metric: str = 'acc_inst', window: int = 5, min_delta: float = 0.5,
               init_threshold: float = 0.0, threshold_step: float = 1.0, patience: int = 0,
               every: int = 10, hierarchical: bool = False):
    all_clusters = [int(k) for k in all_clusters]
    _check_cluster_list(all_clusters)
    _check_num_levels(num_levels, all_clusters)
    if mode not in MODES:
      raise ValueError(f"schedule.mode {mode!r} is unknown; use one of {', '.join(MODES)}")
    if int(patience) != patience or patience < 0:
      raise ValueError(f'schedule.patience must be an integer >= 0 (0: no cap), got {patience}')
    if mode == 'fixed' and (int(every) != every or every < 1):
      raise ValueError(f'schedule.every must be an integer >= 1 in mode=fixed, got {every}')
    self.all_clusters = all_clusters
    self.num_levels = int(num_levels)
    self.mode = mode
    self.metric = metric
    self.patience = int(patience)
    self.every = int(every)
    self.hierarchical = bool(hierarchical)
    self._window = SlidingWindow(window, min_delta, init_threshold, threshold_step)
    self._start = 0  # index in all_clusters of the first active level
    self._stage_start_epoch: Optional[int] = None
    self._last_change_epoch: Optional[int] = None
    self._last_epoch: Optional[int] = None
    self._exhausted = False  # the exhausted message was shown; the schedule is frozen

  @classmethod
  def from_config(cls, schedule_config, hierarchical: bool = False) -> 'ClusterSchedule':
    """Builds the schedule from the `schedule` section of a ml_collections config.

    Args:
      schedule_config: a ConfigDict with fields all_clusters (comma string), num_levels, mode,
        metric, window, min_delta, init_threshold, threshold_step, patience, every.
      hierarchical: `clustering.levels='hierarchical'`; only changes `clustering_order()`.
    """
    return cls(
        all_clusters=parse_cluster_list(schedule_config.all_clusters),
        num_levels=schedule_config.num_levels,
        mode=schedule_config.mode,
        metric=schedule_config.metric,
        window=schedule_config.window,
        min_delta=schedule_config.min_delta,
        init_threshold=schedule_config.init_threshold,
        threshold_step=schedule_config.threshold_step,
        patience=schedule_config.patience,
        every=schedule_config.every,
        hierarchical=hierarchical)

  # --- What the trainer reads. ---

  @property
  def active(self) -> List[int]:
    """The active cluster counts, in all_clusters order (a fresh list)."""
    return self.all_clusters[self._start:self._start + self.num_levels]

  @property
  def newest_k(self) -> int:
    """k of the newest active level (the last of `active`): it sets the label smoothing."""
    return self.active[-1]

  @property
  def threshold(self) -> float:
    """The plateau detector's current threshold (meaningful in plateau mode)."""
    return self._window.threshold

  @property
  def remaining(self) -> int:
    """How many entries of all_clusters are still to come."""
    return len(self.all_clusters) - self._start - self.num_levels

  @property
  def last_change_epoch(self) -> Optional[int]:
    return self._last_change_epoch

  def clustering_order(self) -> List[int]:
    """The active ks in the order to cluster them.

    Hierarchical mode clusters each level's centroids into the next, so it must go fine->coarse
    (descending k) whatever the list direction; flat mode keeps the list order.
    """
    if self.hierarchical:
      return sorted(self.active, reverse=True)
    return self.active

  def validate(self, num_samples: int) -> None:
    """Raises ValueError if the schedule cannot run on `num_samples` training samples."""
    _check_num_levels(self.num_levels, self.all_clusters)
    too_large = [k for k in self.all_clusters if k > num_samples]
    if too_large:
      raise ValueError(
          f'schedule.all_clusters has k={max(too_large)} > N={num_samples} training samples; '
          'use smaller entries')

  # --- The decision after each epoch. ---

  def update(self, epoch: int, metrics: Mapping[str, Any]) -> Decision:
    """Decides, after `epoch`, whether the active levels change.

    Call it once per epoch in which the active levels were used, with increasing epochs.

    Args:
      epoch: the epoch that just ended.
      metrics: that epoch's metrics; plateau mode reads `metrics[self.metric]`.
    Returns:
      A Decision; on 'change' the new levels are already active.
    Raises:
      ValueError: the monitored metric is absent, None or not finite, or `epoch` does not
        increase.
    """
    if self._last_epoch is not None and epoch <= self._last_epoch:
      raise ValueError(
          f'cluster schedule updated for epoch {epoch} after epoch {self._last_epoch}; call '
          'update once per epoch, and restore its state_dict from the same checkpoint as the '
          'model')
    self._last_epoch = epoch
    if self._exhausted:
      return Decision(KEEP, '', self.active)
    if self._stage_start_epoch is None:
      self._stage_start_epoch = epoch
    stage_length = epoch - self._stage_start_epoch + 1

    value = None
    if self.mode == 'fixed':
      if stage_length < self.every:
        return Decision(KEEP, '', self.active)
      reason = 'fixed'
    else:
      value = self._read_metric(metrics)
      action = self._window.update(value)
      if action == CHANGE:
        reason = 'plateau'
      elif self.patience and stage_length >= self.patience:
        reason = 'patience'  # the cap wins over a threshold raise: the stage is over anyway
      elif action == RAISE_THRESHOLD:
        return Decision(RAISE_THRESHOLD,
                        f'Epoch {epoch}: threshold raised to {self._window.threshold:.2f}',
                        self.active)
      else:
        return Decision(KEEP, '', self.active)
    return self._change(epoch, value, reason)

  def _change(self, epoch: int, value: Optional[float], reason: str) -> Decision:
    if self.remaining <= 0:
      self._exhausted = True
      return Decision(EXHAUSTED, f'Epoch {epoch}: all_clusters exhausted, keeping {self.active}',
                      self.active, reason)
    self._start += 1
    self._last_change_epoch = epoch
    self._stage_start_epoch = epoch + 1
    if value is not None:
      self._window.reset(value)
    return Decision(CHANGE, f'Epoch {epoch}: clusters changed -> {self.active}', self.active,
                    reason)

  def _read_metric(self, metrics: Mapping[str, Any]) -> float:
    value = metrics.get(self.metric)
    if value is None:
      available = sorted(k for k, v in metrics.items() if v is not None)
      raise ValueError(
          f'schedule.metric {self.metric!r} is missing from the epoch metrics; set it to one '
          f"of: {', '.join(available)}")
    value = float(value)
    # A NaN would make every comparison false and freeze the schedule without a word.
    if not math.isfinite(value):
      raise ValueError(f'schedule.metric {self.metric!r} is {value}; training has diverged')
    return value

  # --- Checkpointing. ---

  def state_dict(self) -> Dict[str, Any]:
    """Everything `update` depends on, as plain JSON types."""
    return {
        'version': _STATE_VERSION,
        'all_clusters': list(self.all_clusters),
        'num_levels': self.num_levels,
        'mode': self.mode,
        'start': self._start,
        'stage_start_epoch': self._stage_start_epoch,
        'last_change_epoch': self._last_change_epoch,
        'last_epoch': self._last_epoch,
        'exhausted': self._exhausted,
        'window': self._window.state_dict(),
    }

  @staticmethod
  def saved_active(state: Mapping[str, Any]) -> List[int]:
    """The active cluster counts of a `state_dict()`, read from the state alone (an evaluation
    under another schedule config still finds the run's levels)."""
    start = int(state['start'])
    return [int(k) for k in state['all_clusters'][start:start + int(state['num_levels'])]]

  def load_state_dict(self, state: Mapping[str, Any]) -> None:
    """Restores `state_dict()` output; the schedule settings must match the saved ones."""
    if state.get('version') != _STATE_VERSION:
      raise ValueError(
          f"cluster schedule state has version {state.get('version')!r}, expected "
          f'{_STATE_VERSION}; the checkpoint was written by another pcl_jax version')
    saved = (list(state['all_clusters']), int(state['num_levels']), state['mode'])
    current = (self.all_clusters, self.num_levels, self.mode)
    if saved != current:
      raise ValueError(
          'checkpoint was saved with schedule (all_clusters, num_levels, mode) = '
          f'{saved} but the config has {current}; resume with the same schedule settings or '
          'start a new workdir')
    self._window.load_state_dict(state['window'])
    self._start = int(state['start'])
    self._stage_start_epoch = state['stage_start_epoch']
    self._last_change_epoch = state['last_change_epoch']
    self._last_epoch = state['last_epoch']
    self._exhausted = bool(state['exhausted'])


def _check_num_levels(num_levels: int, all_clusters: Sequence[int]) -> None:
  if int(num_levels) != num_levels or not 1 <= num_levels <= len(all_clusters):
    raise ValueError(
        f'schedule.num_levels={num_levels} must be between 1 and the length of '
        f'schedule.all_clusters ({len(all_clusters)}); lower num_levels or add entries')
