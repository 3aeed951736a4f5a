"""PCL's loss as a run configures it: the chosen InfoNCE form plus weighted ProtoNCE.

This module owns the mapping from the `pcl` settings to the loss: one frozen dataclass per form
of `pcl.instance_loss` (`INSTANCE_FORMS`), whose fields are that form's config section
(`pcl.masked.level`, `pcl.attract.share`, ...) and whose call computes it from the batch's
embeddings; `LossSettings`, the static value the step is jitted with; and `pcl_loss`, InfoNCE's
form + `pcl.proto_weight` * ProtoNCE. The formulas are the pure functions of `instance`,
`proto` and `false_negatives`; validation of the settings is `configuration`'s.
"""

import dataclasses
from typing import NamedTuple, Union

import jax

from pcl_jax.losses import false_negatives
from pcl_jax.losses import instance
from pcl_jax.losses import proto


class InstanceInputs(NamedTuple):
  """What a form of InfoNCE may read: the embeddings, the queue's dataset indices, the batch's,
  the prototype bank, the form's PRNG key, ProtoNCE's smoothing epsilon and the temperature."""
  queries: jax.Array
  keys: jax.Array
  queue: jax.Array
  queue_index: jax.Array
  index: jax.Array
  bank: dict
  rng: jax.Array
  smoothing: jax.Array
  temperature: float


def _epsilon(smoothed: bool, inputs: InstanceInputs):
  """InfoNCE's smoothing: ProtoNCE's epsilon when the form's `smoothed` is set, else a Python 0
  (which `instance.info_nce` runs as its cheapest form)."""
  return inputs.smoothing if smoothed else 0.0


@dataclasses.dataclass(frozen=True)
class InfoNCE:
  """'infonce': PCL as published; `smoothed`: label-smoothed with ProtoNCE's epsilon too."""
  smoothed: bool = False

  def __call__(self, inputs: InstanceInputs):
    return instance.info_nce(inputs.queries, inputs.keys, inputs.queue, inputs.temperature,
                             smoothing=_epsilon(self.smoothed, inputs))


@dataclasses.dataclass(frozen=True)
class Masked:
  """'masked': the queue keys of the query's cluster at the `level` ('finest' or 'coarsest'
  active level) leave InfoNCE's negatives."""
  level: str = false_negatives.FINEST
  smoothed: bool = False

  def __call__(self, inputs: InstanceInputs):
    same = false_negatives.same_cluster(inputs.index, inputs.queue_index, inputs.bank,
                                        self.level)
    return instance.masked_info_nce(inputs.queries, inputs.keys, inputs.queue,
                                    inputs.temperature, same > 0,
                                    smoothing=_epsilon(self.smoothed, inputs))


@dataclasses.dataclass(frozen=True)
class Attract:
  """'attract': the queue keys of the query's cluster become extra positives (false-negative
  attraction), by the `level` ('finest', 'coarsest' or 'graded' over the active levels), with
  `share` of the target (0: uniform over the positives)."""
  level: str = false_negatives.FINEST
  share: float = 0.0
  smoothed: bool = False

  def __call__(self, inputs: InstanceInputs):
    same = false_negatives.same_cluster(inputs.index, inputs.queue_index, inputs.bank,
                                        self.level)
    return instance.attract_info_nce(inputs.queries, inputs.keys, inputs.queue,
                                     inputs.temperature, same, share=self.share,
                                     smoothing=_epsilon(self.smoothed, inputs))


@dataclasses.dataclass(frozen=True)
class Debiased:
  """'debiased': debiased InfoNCE with tau+ = `prior`."""
  prior: float = 0.1

  def __call__(self, inputs: InstanceInputs):
    return instance.debiased_info_nce(inputs.queries, inputs.keys, inputs.queue,
                                      inputs.temperature, prior=self.prior)


@dataclasses.dataclass(frozen=True)
class Selected:
  """'selected': HCSC's selection, each level keeping a random subset of the queue as
  negatives, a key the less likely the more it belongs to the query's prototype."""
  smoothed: bool = False

  def __call__(self, inputs: InstanceInputs):
    selected = false_negatives.select_negatives(inputs.queue, inputs.index, inputs.bank,
                                                inputs.rng)
    return instance.selected_info_nce(inputs.queries, inputs.keys, inputs.queue,
                                      inputs.temperature, selected, inputs.bank['active'],
                                      smoothing=_epsilon(self.smoothed, inputs))


InstanceForm = Union[InfoNCE, Masked, Attract, Debiased, Selected]

# pcl.instance_loss -> its form; the form's fields are the config section of the same name.
INSTANCE_FORMS = {'infonce': InfoNCE, 'masked': Masked, 'attract': Attract,
                  'debiased': Debiased, 'selected': Selected}


@dataclasses.dataclass(frozen=True)
class LossSettings:
  """The loss a run trains with (config `pcl.*`; static); the defaults are PCL as published.

  instance: the form of InfoNCE (`pcl.instance_loss` and its section).
  proto_weight: ProtoNCE's weight against InfoNCE (`pcl.proto_weight`; 0: InfoNCE only).
  proto_columns: 'unique' (one column per prototype) or 'reference' (the official code's, one
    per sample; `pcl.proto_columns`).
  """
  instance: InstanceForm = InfoNCE()
  proto_weight: float = 1.0
  proto_columns: str = 'unique'

  @classmethod
  def from_config(cls, pcl_config) -> 'LossSettings':
    """The settings of a validated `pcl` config section: only the chosen form's section is
    read."""
    form = INSTANCE_FORMS[pcl_config.instance_loss]
    return cls(instance=form(**pcl_config[pcl_config.instance_loss].to_dict()),
               proto_weight=pcl_config.proto_weight, proto_columns=pcl_config.proto_columns)


def pcl_loss(queries, keys, queue, queue_index, index, bank, rng, smoothing, *, temperature,
             num_negatives, settings: LossSettings = LossSettings()):
  """InfoNCE's form + proto_weight * ProtoNCE of a batch of embeddings.

  Args:
    queries, keys: [B, D] L2-normalised embeddings of the two views.
    queue, queue_index: [r, D] negative keys and [r] their samples' dataset indices.
    index: [B] dataset index of each sample.
    bank: the prototype bank (`clustering.bank.prototype_bank`).
    rng: PRNG key of the negative-prototype sample (and, folded with 1, of HCSC's selection).
    smoothing: ProtoNCE's label-smoothing epsilon (and InfoNCE's when its form is `smoothed`).
    temperature, num_negatives: PCL constants; settings: `LossSettings` (static).
  Returns:
    (loss, terms): terms are loss_inst, acc_inst, loss_proto, acc_proto.
  """
  # The instance form's own stream: the prototype sample's key is the same whatever the form.
  loss_inst, acc_inst = settings.instance(InstanceInputs(
      queries, keys, queue, queue_index, index, bank, jax.random.fold_in(rng, 1), smoothing,
      temperature))
  loss_proto, acc_proto = proto.mean_proto_nce(queries, index, bank, rng, num_negatives,
                                               smoothing, settings.proto_columns)
  terms = dict(loss_inst=loss_inst, acc_inst=acc_inst, loss_proto=loss_proto,
               acc_proto=acc_proto)
  return loss_inst + settings.proto_weight * loss_proto, terms
