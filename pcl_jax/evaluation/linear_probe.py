"""Linear probe: multinomial logistic regression on frozen features, with a learning-rate sweep.

Optax Adam, full batch, `PROBE_STEPS` steps, L2 `PROBE_WEIGHT_DECAY`, on the reference features
standardised with their own mean/std; the learning rate is picked from `PROBE_LEARNING_RATES`
by top-1 on a held-out `PROBE_HOLDOUT_FRACTION` of the reference set, and the probe trained with
it on the rest is scored on the queries. Jitted and vmapped over the rates.
"""

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pcl_jax.evaluation import protocol

PROBE_LEARNING_RATES = (0.003, 0.01, 0.03, 0.1)
PROBE_STEPS = 300
PROBE_WEIGHT_DECAY = 1e-4
PROBE_HOLDOUT_FRACTION = 0.2


@functools.partial(jax.jit, static_argnames=('num_classes', 'steps'))
def _train_probes(fit_x, fit_y, eval_sets, learning_rates, weight_decay, *, num_classes: int,
                  steps: int):
  """Full-batch Adam logistic regressions, one per learning rate (vmapped). Jitted.

  Returns the correct-prediction count of each probe on each (x, y) of `eval_sets`:
  [len(sets), len(lrs)].
  """

  def train_one(lr):
    tx = optax.adam(lr)
    params = {'w': jnp.zeros((fit_x.shape[1], num_classes)), 'b': jnp.zeros((num_classes,))}

    def loss_fn(p):
      logits = fit_x @ p['w'] + p['b']
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, fit_y).mean()
      return ce + 0.5 * weight_decay * jnp.sum(p['w'] ** 2)

    def step(carry, _):
      p, opt_state = carry
      grads = jax.grad(loss_fn)(p)
      updates, opt_state = tx.update(grads, opt_state, p)
      return (optax.apply_updates(p, updates), opt_state), None

    (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), None, length=steps)
    return jnp.stack([jnp.sum(jnp.argmax(x @ params['w'] + params['b'], -1) == y)
                      for x, y in eval_sets])

  return jax.vmap(train_one, out_axes=1)(learning_rates)


def linear_probe(train_features, train_labels, test_features, test_labels, *,
                 learning_rates: Sequence[float] = PROBE_LEARNING_RATES,
                 steps: int = PROBE_STEPS, weight_decay: float = PROBE_WEIGHT_DECAY,
                 holdout_fraction: float = PROBE_HOLDOUT_FRACTION,
                 seed: int = protocol.EVAL_SEED) -> dict:
  """Logistic-regression probe on frozen features with a learning-rate sweep.

  The train features are standardised (their mean/std), split into fit and held-out parts
  (seeded); one probe per learning rate is trained on the fit part (full batch, jitted, vmapped
  over rates); the rate with the best held-out top-1 (the smallest on ties) gives the reported
  test top-1 of its probe.

  Returns:
    {'top1': test top-1 percent, 'lr': chosen rate, 'holdout_top1': {str(lr): percent},
     'steps': steps}.
  """
  train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)
  classes, train_y, test_y = protocol.dense_labels(train_labels, test_labels)
  train_x = jnp.asarray(train_features, jnp.float32)
  test_x = jnp.asarray(test_features, jnp.float32)
  mean = train_x.mean(axis=0)
  std = train_x.std(axis=0) + 1e-6
  train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
  order = np.random.default_rng(seed).permutation(train_y.size)
  num_holdout = max(1, int(round(holdout_fraction * train_y.size)))
  holdout, fit = np.sort(order[:num_holdout]), np.sort(order[num_holdout:])
  rates = jnp.asarray(learning_rates, jnp.float32)
  correct = np.asarray(_train_probes(
      train_x[fit], jnp.asarray(train_y[fit]),
      ((train_x[holdout], jnp.asarray(train_y[holdout])), (test_x, jnp.asarray(test_y))),
      rates, jnp.float32(weight_decay), num_classes=int(classes.size), steps=int(steps)))
  top1 = 100.0 * correct / np.array([[holdout.size], [test_y.size]], np.float64)
  best = int(np.argmax(top1[0]))
  return {'top1': float(top1[1, best]), 'lr': float(learning_rates[best]),
          'holdout_top1': {f'{lr:g}': float(acc) for lr, acc in zip(learning_rates, top1[0])},
          'steps': int(steps)}
