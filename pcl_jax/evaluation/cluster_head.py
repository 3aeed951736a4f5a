"""A clustering stage on frozen features: heads trained so that nearest neighbours agree.

This module owns `eval.cluster_head`: it clusters features into k groups without labels by
SCAN's clustering step (Van Gansbeke et al., ECCV 2020). Each sample's `NUM_NEIGHBOURS` nearest
neighbours are mined once (Euclidean distance: for normalised features, cosine); `NUM_HEADS`
linear softmax heads are trained together (optax Adam, minibatches of anchors, each paired with
one of its neighbours drawn at random) to minimise

  -mean_i log <p(x_i), p(x_j)>  -  ENTROPY_WEIGHT * H(mean_i p(x_i)),

the disagreement of neighbours against the entropy of the mean assignment, which keeps the
clusters from collapsing into one. The head of lowest loss over all (sample, neighbour) pairs
is kept, and each sample goes to its most probable cluster. The training is one jitted
`lax.scan`, vmapped over the heads. The settings below were chosen on one run's training-split
features (benchmarks/cluster_head.py --tune; docs/evaluation.md). It never reads labels and never
touches a checkpoint.
"""

import functools
from typing import Dict

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pcl_jax.evaluation import clustering_quality
from pcl_jax.evaluation import protocol

METHOD = 'scan'
NUM_NEIGHBOURS = 10
ENTROPY_WEIGHT = 3.0
NUM_HEADS = 10
STEPS = 1000
BATCH_SIZE = 256
LEARNING_RATE = 3e-2
# Rows of the similarity matrix computed at once when mining neighbours (memory chunk x N).
MINING_CHUNK = 1024
_EPS = 1e-8


def scan_loss(anchor_logits, neighbour_logits, entropy_weight: float):
  """SCAN's clustering loss of one head (pure, jittable).

  Args:
    anchor_logits: [B, k] logits of the anchors.
    neighbour_logits: [B, k] logits of one neighbour of each anchor.
    entropy_weight: the weight of the entropy of the mean anchor assignment.
  Returns:
    (total, consistency, entropy): consistency = -mean_i log <p_i, p_j>, entropy = the entropy
    of mean_i p_i, total = consistency - entropy_weight * entropy.
  """
  anchor_probs = jax.nn.softmax(anchor_logits, axis=-1)
  neighbour_probs = jax.nn.softmax(neighbour_logits, axis=-1)
  agreement = jnp.sum(anchor_probs * neighbour_probs, axis=-1)
  consistency = -jnp.mean(jnp.log(agreement + _EPS))
  mean_probs = jnp.mean(anchor_probs, axis=0)
  entropy = -jnp.sum(mean_probs * jnp.log(mean_probs + _EPS))
  return consistency - entropy_weight * entropy, consistency, entropy


@functools.partial(jax.jit, static_argnames=('num_neighbours',))
def mine_neighbours(features, *, num_neighbours: int):
  """[N, num_neighbours] indices of each row's nearest other rows (Euclidean: for the
  evaluation's L2-normalised features the most cosine-similar). Jitted; the distances are
  computed `MINING_CHUNK` rows at a time, so memory is chunk x N."""
  num = features.shape[0]
  sq_norms = jnp.sum(features * features, axis=1)
  pad = (-num) % MINING_CHUNK
  rows = jnp.pad(jnp.arange(num), (0, pad)).reshape(-1, MINING_CHUNK)

  def chunk(row_ids):
    dot = jnp.dot(features[row_ids], features.T, precision=jax.lax.Precision.HIGHEST)
    # -||a - b||^2 up to the row's own constant ||a||^2, which does not change its order.
    closeness = 2.0 * dot - sq_norms[None, :]
    # A sample is not its own neighbour.
    closeness = jnp.where(row_ids[:, None] == jnp.arange(num)[None, :], -jnp.inf, closeness)
    return jax.lax.top_k(closeness, num_neighbours)[1]

  return jax.lax.map(chunk, rows).reshape(-1, num_neighbours)[:num]


def _head_logits(params, features):
  """[heads, N, k] logits of every head."""
  return jnp.einsum('nd,hdk->hnk', features, params['w']) + params['b'][:, None, :]


@functools.partial(jax.jit, static_argnames=('k', 'num_heads', 'steps', 'batch_size'))
def _train_heads(features, neighbours, seed, *, k: int, num_heads: int, steps: int,
                 batch_size: int, learning_rate: float, entropy_weight: float):
  """Trains `num_heads` heads on SCAN's loss; returns (params, loss of each head on every
  (sample, neighbour) pair [heads]). Jitted."""
  num, dim = features.shape
  init_key, step_key = jax.random.split(jax.random.PRNGKey(seed))
  # Small random weights: each head starts from its own near-uniform assignment.
  params = {'w': 0.01 * jax.random.normal(init_key, (num_heads, dim, k)),
            'b': jnp.zeros((num_heads, k))}
  tx = optax.adam(learning_rate)
  per_head_loss = jax.vmap(lambda a, n: scan_loss(a, n, entropy_weight)[0])

  def loss_fn(p, anchors, neighbours_of_batch):
    losses = per_head_loss(_head_logits(p, anchors), _head_logits(p, neighbours_of_batch))
    return jnp.sum(losses)  # heads are independent: the sum trains each on its own loss

  def step(carry, step_index):
    p, opt_state = carry
    batch_key, neighbour_key = jax.random.split(jax.random.fold_in(step_key, step_index))
    anchor_ids = jax.random.choice(batch_key, num, (batch_size,), replace=False)
    pick = jax.random.randint(neighbour_key, (batch_size,), 0, neighbours.shape[1])
    neighbour_ids = neighbours[anchor_ids, pick]
    grads = jax.grad(loss_fn)(p, features[anchor_ids], features[neighbour_ids])
    updates, opt_state = tx.update(grads, opt_state, p)
    return (optax.apply_updates(p, updates), opt_state), None

  (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), jnp.arange(steps))

  # Every head's loss on all pairs: the anchor's probabilities against the mean over its
  # neighbours' of the agreement, with the entropy of the whole set's mean assignment.
  probs = jax.nn.softmax(_head_logits(params, features), axis=-1)  # [H, N, k]
  # One neighbour rank at a time: memory heads x N x k, not x neighbours as well.
  agreement = jax.lax.map(lambda column: jnp.sum(probs * probs[:, column], axis=-1),
                          neighbours.T)  # [neighbours, H, N]
  consistency = -jnp.mean(jnp.log(agreement + _EPS), axis=(0, 2))
  mean_probs = jnp.mean(probs, axis=1)
  entropy = -jnp.sum(mean_probs * jnp.log(mean_probs + _EPS), axis=1)
  return params, consistency - entropy_weight * entropy


def fit_assign(features, k: int, *, seed: int = protocol.EVAL_SEED,
               num_neighbours: int = NUM_NEIGHBOURS, entropy_weight: float = ENTROPY_WEIGHT,
               num_heads: int = NUM_HEADS, steps: int = STEPS, batch_size: int = BATCH_SIZE,
               learning_rate: float = LEARNING_RATE) -> Dict[str, object]:
  """Clusters `features` [N, D] into `k` groups with the head of lowest loss (module docstring).

  The keyword settings default to the module's constants (what the evaluation uses); the
  benchmark varies them.

  Returns:
    {'assignments': int array [N] in 0..k-1, 'loss': the kept head's loss, 'head': its index,
     'losses': every head's loss}.
  Raises:
    ValueError: fewer samples than k, or than the neighbours mined + 1.
  """
  features = jnp.asarray(features, jnp.float32)
  num = features.shape[0]
  if num < k:
    raise ValueError(f'the cluster head needs at least k={k} samples, got {num}')
  num_neighbours = min(num_neighbours, num - 1)
  if num_neighbours < 1:
    raise ValueError(f'the cluster head needs at least 2 samples, got {num}')
  neighbours = mine_neighbours(features, num_neighbours=num_neighbours)
  params, losses = _train_heads(features, neighbours, seed, k=int(k), num_heads=num_heads,
                                steps=steps, batch_size=min(batch_size, num),
                                learning_rate=learning_rate, entropy_weight=entropy_weight)
  losses = np.asarray(losses)
  best = int(np.argmin(losses))
  logits = features @ params['w'][best] + params['b'][best]
  return {'assignments': np.asarray(jnp.argmax(logits, axis=1)), 'loss': float(losses[best]),
          'head': best, 'losses': [float(x) for x in losses]}


def cluster_head_results(eval_features, eval_labels, k: int, train_features=None, *,
                         seed: int = protocol.EVAL_SEED):
  """The clustering stage of the evaluation: fits on the eval split's features, with the train
  split's appended when given (more neighbours of the same classes), and scores the eval split.

  Args:
    eval_features: [N, D]; eval_labels: [N] integer labels, or None (unlabelled: the metrics
      are null with `skipped`).
    k: the number of clusters.
    train_features: [M, D] features of the same classes, or None.
    seed: the heads' initialisation and batches.
  Returns:
    (results {'k', 'nmi', 'ami', 'ari', 'acc' (percent), 'method', 'num_fit', 'neighbours',
     'entropy_weight', 'heads', 'loss'}, the eval split's assignments int array [N]).
  """
  eval_features = np.asarray(eval_features, np.float32)
  fit_features = eval_features
  if train_features is not None:
    fit_features = np.concatenate([eval_features, np.asarray(train_features, np.float32)])
  fit = fit_assign(fit_features, k, seed=seed)
  assignments = fit['assignments'][:eval_features.shape[0]]
  if eval_labels is None:
    metrics = {'nmi': None, 'ami': None, 'ari': None, 'acc': None, 'skipped': 'no labels'}
  else:
    metrics = clustering_quality.clustering_metrics(eval_labels, assignments)
  results = {'k': int(k), **metrics, 'method': METHOD, 'num_fit': int(fit_features.shape[0]),
             'neighbours': min(NUM_NEIGHBOURS, fit_features.shape[0] - 1),
             'entropy_weight': ENTROPY_WEIGHT, 'heads': NUM_HEADS, 'loss': fit['loss']}
  return results, assignments
