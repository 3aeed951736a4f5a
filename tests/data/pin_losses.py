"""Pins what the loss settings of the committed studies computed before pcl.instance_loss.

Run at the commit before pcl.instance_loss (the nine pcl.* switches of step.LossSwitches):

  python tests/data/pin_losses.py > tests/data/pinned_losses.json

It writes, for each loss-switch combination a committed study file or config uses (old names),
`step.pcl_loss`'s loss and terms and two projections of its gradient with respect to the
queries, on fixed embeddings with an active prototype bank and a warm-up one; one jitted
`train_step` of configs/test.py under the recipe's switches; and, for every committed study
file, each variant's `pcl` and `clustering` sections as its cells' config.json stored them.
"""

import json
import glob
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from configs import test as test_config  # pylint: disable=g-import-not-at-top
from pcl_jax.clustering import bank as bank_lib
from pcl_jax import models
from pcl_jax.run import parallel
from pcl_jax import state as state_lib
from pcl_jax import step as step_lib
from pcl_jax.study import runner

_HALF = {'proto_weight': 0.5}
COMBINATIONS = {
    'plain': {},
    'mask': {'mask_same_cluster_negatives': True},
    'attract': {'attract_same_cluster': True},
    'proto_weight_half': _HALF,
    'proto_weight_double': {'proto_weight': 2.0},
    'reference_columns': {'proto_columns': 'reference'},
    'smooth_instance': {'smooth_instance': True},
    'debias': {'debias_prior': 0.1},
    'select': {'select_negatives': True},
    'mask_half': {'mask_same_cluster_negatives': True, **_HALF},
    'mask_coarsest_half': {'mask_same_cluster_negatives': True, 'mask_level': 'coarsest',
                           **_HALF},
    'attract_half': {'attract_same_cluster': True, **_HALF},
    'attract_coarsest_half': {'attract_same_cluster': True, 'mask_level': 'coarsest', **_HALF},
    'attract_share_half': {'attract_same_cluster': True, 'attract_share': 0.5, **_HALF},
    'attract_share_coarsest_half': {'attract_same_cluster': True, 'attract_share': 0.5,
                                    'mask_level': 'coarsest', **_HALF},
    'attract_graded_half': {'attract_same_cluster': True, 'mask_level': 'graded', **_HALF},
}


def embeddings():
  """Unit queries [8, 16], keys near them, and a queue [64, 16]."""
  rng = np.random.default_rng(4)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  queries = unit(rng.normal(size=(8, 16)).astype(np.float32))
  queue = unit(rng.normal(size=(64, 16)).astype(np.float32))
  keys = unit(unit(rng.normal(size=(8, 16)).astype(np.float32)) + queries)
  return queries, keys, queue


def banks():
  """An active bank (levels of 6 and 3 prototypes, a third slot unused) and a warm-up one."""
  rng = np.random.default_rng(6)
  levels = [{'centroids': rng.normal(size=(k, 16)).astype(np.float32),
             'im2cluster': rng.integers(0, k, 64),
             'concentration': rng.uniform(0.05, 0.5, k).astype(np.float32)} for k in (6, 3)]
  active = bank_lib.prototype_bank(levels, 3, 6)
  return {'active': active, 'warmup': dict(active, active=jnp.zeros(3, bool))}


def queue_index():
  return jnp.asarray(np.random.default_rng(5).integers(-1, 64, 64))


def projection():
  return np.random.default_rng(8).normal(size=(8, 16)).astype(np.float32)


def _record(loss, terms, grad):
  out = {name: float(value) for name, value in dict(terms, loss=loss).items()}
  out['grad_norm'] = float(jnp.linalg.norm(grad))
  out['grad_projection'] = float(jnp.sum(grad * projection()))
  return out


def pinned_losses():
  queries, keys, queue = embeddings()
  out = {}
  for name, switches in COMBINATIONS.items():
    out[name] = {'switches': switches}
    for bank_name, bank in banks().items():
      def loss_fn(q, bank=bank, switches=switches):
        return step_lib.pcl_loss(q, keys, queue, queue_index(), jnp.arange(8, 16), bank,
                                 jax.random.PRNGKey(0), jnp.float32(0.1), temperature=0.2,
                                 num_negatives=64,
                                 switches=step_lib.LossSwitches(**switches))
      (loss, terms), grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(queries)
      out[name][bank_name] = _record(loss, terms, grad)
  return out


RECIPE_STEP = {'pcl.attract_same_cluster': True, 'pcl.attract_share': 0.5,
               'pcl.proto_weight': 0.5}


def pinned_step():
  """One jitted train_step of configs/test.py with the recipe's switches, on an active bank."""
  config = test_config.get_config()
  runner.apply_overrides(config, RECIPE_STEP, 'pin')
  model = models.encoder_from_config(config, bn_groups=2)
  schedule = state_lib.make_lr_schedule(config.optim, 2, 4)
  tx = state_lib.make_optimizer(config.optim, schedule)
  state = state_lib.create_state(jax.random.PRNGKey(0), model, tx, 16, config.pcl.num_negatives)
  state = jax.device_put(state, parallel.replicated(parallel.data_mesh()))
  step = step_lib.make_train_step(config, model, tx, schedule)
  rng = np.random.default_rng(2)
  batch = {view: rng.integers(0, 256, (32, 16, 16, 3), dtype=np.uint8)
           for view in ('im_q', 'im_k')}
  batch['index'] = np.arange(32)
  state = state.replace(queue_index=jnp.asarray(np.random.default_rng(9).integers(-1, 64, 64)))
  bank = banks()['active']
  bank = dict(bank, prototypes=bank['prototypes'],
              im2cluster=jnp.asarray(np.random.default_rng(10).integers(0, 3, (3, 1797))))
  new_state, metrics = step(state, batch, bank, {'smoothing': jnp.float32(0.1)})
  out = {name: float(value) for name, value in metrics.items()}
  out['params_sum'] = float(sum(jnp.sum(leaf) for leaf in jax.tree.leaves(new_state.params)))
  return {'overrides': RECIPE_STEP, 'metrics': out}


def study_sections():
  """Each committed study's variants: their cells' pcl and clustering sections."""
  out = {}
  for path in sorted(glob.glob(os.path.join(ROOT, 'configs', 'studies', '*.py'))):
    study = runner.load_study(os.path.relpath(path, ROOT))
    cells = runner.cell_configs(study, {'data.root': '/data/images'})
    variants = {}
    for cell in cells:
      if cell.seed == study.seeds[0]:
        variants[cell.variant] = {section: cell.config[section].to_dict()
                                  for section in ('pcl', 'clustering')}
    out[os.path.basename(path)] = variants
  return out


if __name__ == '__main__':
  os.chdir(ROOT)
  json.dump({'losses': pinned_losses(), 'step': pinned_step(), 'studies': study_sections()},
            sys.stdout, indent=1, sort_keys=True)
  print()
