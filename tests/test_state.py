"""PCLState construction, the momentum update and the FIFO queue, against numpy."""

import jax
import jax.numpy as jnp
import numpy as np

from pcl_jax import models
from pcl_jax import state as state_lib
from pcl_jax import step as step_lib
from configs import test as test_config


def test_momentum_update_matches_numpy():
  rng = np.random.default_rng(0)
  key = {'a': rng.normal(size=(3, 4)), 'b': {'c': rng.normal(size=5)}}
  query = {'a': rng.normal(size=(3, 4)), 'b': {'c': rng.normal(size=5)}}
  updated = state_lib.momentum_update(key, query, 0.99)
  np.testing.assert_allclose(updated['a'], 0.99 * key['a'] + 0.01 * query['a'])
  np.testing.assert_allclose(updated['b']['c'], 0.99 * key['b']['c'] + 0.01 * query['b']['c'])


def test_enqueue_fills_in_order_and_wraps_around():
  queue = jnp.zeros((6, 2))
  ptr = jnp.zeros((), jnp.int32)
  expected = np.zeros((6, 2))
  for step in range(5):  # 5 batches of 2 into 6 slots: wraps after the third
    keys = jnp.full((2, 2), step + 1.0)
    queue, ptr = state_lib.enqueue(queue, ptr, keys)
    start = (2 * step) % 6
    expected[start:start + 2] = step + 1.0
    np.testing.assert_array_equal(queue, expected)
    assert int(ptr) == (2 * (step + 1)) % 6


def test_enqueue_wraps_when_queue_is_not_a_multiple_of_the_batch():
  queue, ptr = jnp.zeros((5, 1)), jnp.zeros((), jnp.int32)
  for step in range(3):  # batches of 2 into 5 slots: the third batch is split over the end
    queue, ptr = state_lib.enqueue(queue, ptr, jnp.full((2, 1), step + 1.0))
  np.testing.assert_array_equal(queue[:, 0], [3.0, 1.0, 2.0, 2.0, 3.0])
  assert int(ptr) == 1


def test_create_state_copies_query_into_key_and_normalises_queue():
  config = test_config.get_config()
  model = models.encoder_from_config(config)
  tx = state_lib.make_optimizer(config.optim, state_lib.make_lr_schedule(config.optim, 2, 5))
  state = state_lib.create_state(jax.random.PRNGKey(0), model, tx, 16, 64)
  for q, k in zip(jax.tree_util.tree_leaves(state.params),
                  jax.tree_util.tree_leaves(state.key_params)):
    np.testing.assert_array_equal(q, k)
  assert state.queue.shape == (64, config.model.dim)
  np.testing.assert_allclose(np.linalg.norm(state.queue, axis=1), 1.0, rtol=1e-5)
  assert int(state.queue_ptr) == 0 and int(state.step) == 0
