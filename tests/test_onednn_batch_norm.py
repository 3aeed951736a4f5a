"""oneDNN's training batch norm (+ ReLU) as XLA custom calls, against a numpy reference.

The whole-encoder check (conv_impl=onednn runs these with oneDNN's convolutions, against XLA)
is test_torch_conv's encoder test.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pcl_jax import kernels
from pcl_jax.kernels.onednn import batch_norm as onednn_batch_norm
from pcl_jax.kernels.onednn import library as onednn_library
from pcl_jax import models

AVAILABLE, WHY_NOT = onednn_library.available()
pytestmark = pytest.mark.skipif(not AVAILABLE, reason=f'onednn unavailable: {WHY_NOT}')
EPSILON = 1e-5


def _numpy_batch_norm(x, scale, bias, groups, relu):
  """(out, mean [G, C], biased var [G, C], normalised x) in float64, per sample group."""
  grouped = x.astype(np.float64).reshape((groups, -1) + x.shape[1:])
  axes = (1, 2, 3)
  mean = grouped.mean(axes)
  var = grouped.var(axes)
  normalised = (grouped - mean[:, None, None, None]) / np.sqrt(var[:, None, None, None] + EPSILON)
  out = normalised * scale + bias
  if relu:
    out = np.maximum(out, 0.0)
  return out.reshape(x.shape), mean, var, normalised


def _numpy_backward(x, scale, bias, groups, relu, out_grad, mean_grad, var_grad):
  """d x, d scale, d bias of <out, out_grad> + <mean, mean_grad> + <var, var_grad>: the
  textbook BN backward, then the statistics' own terms."""
  out, mean, var, normalised = _numpy_batch_norm(x, scale, bias, groups, relu)
  grad = out_grad.astype(np.float64) * ((out > 0) if relu else 1.0)
  grad = grad.reshape(normalised.shape)
  axes = (1, 2, 3)
  count = normalised[0].size // x.shape[-1]
  bias_grad = grad.sum(axes)
  scale_grad = (grad * normalised).sum(axes)
  inv_std = 1.0 / np.sqrt(var + EPSILON)
  x_grad = (scale * inv_std)[:, None, None, None] / count * (
      count * grad - bias_grad[:, None, None, None]
      - normalised * scale_grad[:, None, None, None])
  centred = x.reshape(normalised.shape) - mean[:, None, None, None]
  x_grad += (mean_grad[:, None, None, None] + 2.0 * var_grad[:, None, None, None] * centred) / count
  return x_grad.reshape(x.shape), scale_grad.sum(0), bias_grad.sum(0)


CASES = [(1, True, (4, 5, 5, 12)),    # odd spatial size, channels not a multiple of the vector
         (4, True, (8, 6, 6, 32)),    # shuffle-BN's groups
         (2, False, (6, 3, 4, 16))]   # no ReLU


def _inputs(shape, seed=0):
  rng = np.random.default_rng(seed)
  x = (rng.normal(size=shape) * 2.0 + 0.5).astype(np.float32)
  scale = rng.normal(size=shape[-1:]).astype(np.float32)
  bias = rng.normal(size=shape[-1:]).astype(np.float32)
  return x, scale, bias, rng


@pytest.mark.parametrize('groups,relu,shape', CASES)
def test_forward_matches_numpy(groups, relu, shape):
  x, scale, bias, _ = _inputs(shape)
  run = jax.jit(onednn_batch_norm.batch_norm, static_argnums=(3, 4, 5))
  got = run(x, scale, bias, groups, EPSILON, relu)
  want = _numpy_batch_norm(x, scale, bias, groups, relu)[:3]
  for name, g, w in zip(('out', 'mean', 'var'), got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=name)
  if relu:
    assert float(jnp.min(got[0])) == 0.0  # the ReLU did clip something


@pytest.mark.parametrize('groups,relu,shape', CASES)
@pytest.mark.parametrize('statistics_too', [False, True])
def test_gradients_match_numpy(groups, relu, shape, statistics_too):
  """The custom VJP, with the statistics' cotangents zero (training: only the running averages
  read them, so they arrive as symbolic zeros) and non-zero."""
  x, scale, bias, rng = _inputs(shape, seed=1)
  out_grad = rng.normal(size=shape).astype(np.float32)
  stats_shape = (groups, shape[-1])
  mean_grad, var_grad = (rng.normal(size=(2,) + stats_shape).astype(np.float32)
                         if statistics_too else np.zeros((2,) + stats_shape, np.float32))

  def objective(x, scale, bias):
    out, mean, var = onednn_batch_norm.batch_norm(x, scale, bias, groups, EPSILON, relu)
    value = jnp.vdot(out, out_grad)
    if statistics_too:
      value += jnp.vdot(mean, mean_grad) + jnp.vdot(var, var_grad)
    return value
  grad = jax.jit(jax.grad(objective, argnums=(0, 1, 2)))
  got = grad(x, scale, bias)
  want = _numpy_backward(x, scale, bias, groups, relu, out_grad, mean_grad, var_grad)
  for name, g, w in zip(('x', 'scale', 'bias'), got, want):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * np.abs(w).max(), err_msg=name)
  assert ('pcl_onednn_batch_norm_backward' in grad.lower(x, scale, bias).as_text())


def _module_run(impl, x, dtype=jnp.float32):
  module = models.GroupedBatchNorm(use_running_average=False, num_groups=2, activation=jax.nn.relu,
                                   kernels=kernels.select(impl), dtype=dtype)
  variables = module.init(jax.random.PRNGKey(0), x)
  apply = jax.jit(lambda v, x: module.apply(v, x, mutable=['batch_stats']))
  return apply(variables, x), apply.lower(variables, x).as_text()


def test_grouped_batch_norm_module_onednn_equals_xla():
  """models.GroupedBatchNorm with oneDNN's kernels: same output and running statistics as XLA's."""
  x = _inputs((4, 6, 6, 8), seed=2)[0]
  (got, got_stats), text = _module_run('onednn', x)
  (want, want_stats), _ = _module_run('xla', x)
  assert 'pcl_onednn_batch_norm_forward' in text
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  for g, w in zip(jax.tree_util.tree_leaves(got_stats), jax.tree_util.tree_leaves(want_stats)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_bfloat16_falls_back_to_xla():
  """oneDNN's BN here is float32 only; a bf16 model computes its BN in XLA."""
  x = jnp.asarray(_inputs((4, 6, 6, 8), seed=3)[0], jnp.bfloat16)
  (out, _), text = _module_run('onednn', x, dtype=jnp.bfloat16)
  assert 'pcl_onednn' not in text and out.dtype == jnp.bfloat16


def test_onednn_encoder_runs_every_training_batch_norm_on_onednn():
  """A ResNet-18 with conv_impl=onednn: each of its 20 BN layers is one forward custom call
  (the ReLU fused where the block has one), and evaluation keeps XLA's BN."""
  model = models.create_encoder('resnet18', dim=8, small_stem=True, width=8, kernels=kernels.select('onednn'))
  images = jnp.ones((4, 8, 8, 3))
  variables = model.init(jax.random.PRNGKey(0), images, train=False)
  train = jax.jit(lambda v: model.apply(v, images, train=True, mutable=['batch_stats']))
  assert train.lower(variables).as_text().count('pcl_onednn_batch_norm_forward') == 20
  evaluate = jax.jit(lambda v: model.apply(v, images, train=False))
  assert 'pcl_onednn_batch_norm' not in evaluate.lower(variables).as_text()
