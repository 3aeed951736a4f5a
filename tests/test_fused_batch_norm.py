"""fused_batch_norm against PyTorch (float64 autograd, an independent implementation with the same
max-pool tie rule) and the Conv4 block against its unfused formulation."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from pcl_jax.kernels import fused_batch_norm
from pcl_jax.kernels import max_pool
from pcl_jax import models

EPS = 1e-5


def _torch_reference(x, scale, bias, num_groups, out_grad, mean_grad, var_grad):
  """(out, mean, var, dx, dscale, dbias) by torch autograd in float64: BN per sample group,
  ReLU, floor-mode 2x2 max-pool, loss <out, g> + <mean, g_mean> + <var, g_var>."""
  xt = torch.tensor(np.asarray(x, np.float64)).permute(0, 3, 1, 2).requires_grad_()
  st = torch.tensor(np.asarray(scale, np.float64), requires_grad=True)
  bt = torch.tensor(np.asarray(bias, np.float64), requires_grad=True)
  outs, means, variances = [], [], []
  for group in xt.chunk(num_groups):
    mean = group.mean((0, 2, 3))
    var = group.var((0, 2, 3), unbiased=False)
    normalised = torch.nn.functional.batch_norm(group, None, None, st, bt, training=True, eps=EPS)
    outs.append(torch.nn.functional.max_pool2d(torch.relu(normalised), 2))
    means.append(mean)
    variances.append(var)
  out, mean, var = torch.cat(outs), torch.stack(means), torch.stack(variances)
  loss = ((out * torch.tensor(np.asarray(out_grad, np.float64)).permute(0, 3, 1, 2)).sum()
          + (mean * torch.tensor(np.asarray(mean_grad, np.float64))).sum()
          + (var * torch.tensor(np.asarray(var_grad, np.float64))).sum())
  loss.backward()
  return (out.detach().permute(0, 2, 3, 1).numpy(), mean.detach().numpy(), var.detach().numpy(),
          xt.grad.permute(0, 2, 3, 1).numpy(), st.grad.numpy(), bt.grad.numpy())


def _fused(x, scale, bias, num_groups, out_grad, mean_grad, var_grad):
  def loss(x, scale, bias):
    out, mean, var = fused_batch_norm.batch_norm_relu_max_pool(x, scale, bias, num_groups, EPS)
    return jnp.vdot(out, out_grad) + jnp.vdot(mean, mean_grad) + jnp.vdot(var, var_grad), (
        out, mean, var)
  (_, (out, mean, var)), grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(
      x, scale, bias)
  return (out, mean, var) + tuple(grads)


def _inputs(shape, num_groups, seed=0, tied=False):
  rng = np.random.default_rng(seed)
  batch, height, width, channels = shape
  if tied:  # constant 2x2 windows: every window's elements tie, as in a flat image region
    x = rng.normal(size=(batch, height // 2, width // 2, channels)).repeat(2, 1).repeat(2, 2)
  else:
    x = rng.normal(size=shape) * 2 + 0.5
  scale = rng.uniform(0.5, 1.5, channels)
  bias = rng.normal(size=channels) * 0.3
  out_grad = rng.normal(size=(batch, height // 2, width // 2, channels))
  mean_grad = rng.normal(size=(num_groups, channels))
  var_grad = rng.normal(size=(num_groups, channels))
  return [np.asarray(a, np.float32) for a in (x, scale, bias, out_grad, mean_grad, var_grad)]


@pytest.mark.parametrize('shape,num_groups', [((4, 8, 8, 3), 1), ((6, 9, 7, 5), 2),
                                              ((8, 6, 6, 4), 4)])
def test_values_and_gradients_match_torch(shape, num_groups):
  x, scale, bias, out_grad, mean_grad, var_grad = _inputs(shape, num_groups)
  expected = _torch_reference(x, scale, bias, num_groups, out_grad, mean_grad, var_grad)
  actual = _fused(x, scale, bias, num_groups, out_grad, mean_grad, var_grad)
  for name, want, got in zip(['out', 'mean', 'var', 'dx', 'dscale', 'dbias'], expected, actual):
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4, atol=2e-4, err_msg=name)


def test_tied_windows_send_the_gradient_to_the_first_element_as_torch_does():
  x, scale, bias, out_grad, mean_grad, var_grad = _inputs((4, 6, 6, 3), 1, tied=True)
  expected = _torch_reference(x, scale, bias, 1, out_grad, mean_grad, var_grad)
  actual = _fused(x, scale, bias, 1, out_grad, mean_grad, var_grad)
  np.testing.assert_allclose(np.asarray(actual[3]), expected[3], rtol=2e-4, atol=2e-4)
  # Not split between the ties: the other three elements get BN's terms only.
  dx = np.asarray(actual[3])
  assert not np.allclose(dx[:, 0::2, 0::2], dx[:, 1::2, 1::2], atol=1e-3)


def test_zero_scale_passes_no_gradient_to_the_input_through_the_output():
  x, scale, bias, out_grad, _, _ = _inputs((4, 6, 6, 3), 2)
  zeros = np.zeros((2, 3), np.float32)
  scale = np.zeros_like(scale)
  expected = _torch_reference(x, scale, bias, 2, out_grad, zeros, zeros)
  actual = _fused(x, scale, bias, 2, out_grad, zeros, zeros)
  for want, got in zip(expected, actual):
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4, atol=2e-4)
  assert np.abs(np.asarray(actual[3])).max() == 0.0


def test_bfloat16_input_keeps_float32_statistics():
  x, scale, bias, *_ = _inputs((4, 8, 8, 3), 2)
  out32, mean32, var32 = fused_batch_norm.batch_norm_relu_max_pool(x, scale, bias, 2, EPS)
  out16, mean16, var16 = fused_batch_norm.batch_norm_relu_max_pool(
      jnp.asarray(x, jnp.bfloat16), scale, bias, 2, EPS)
  assert out16.dtype == jnp.bfloat16 and mean16.dtype == var16.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out16, np.float32), out32, rtol=0.05, atol=0.05)
  np.testing.assert_allclose(mean16, mean32, rtol=0.02, atol=0.02)
  grad = jax.grad(lambda x: fused_batch_norm.batch_norm_relu_max_pool(x, scale, bias, 2, EPS)[0]
                  .astype(jnp.float32).sum())(jnp.asarray(x, jnp.bfloat16))
  assert grad.dtype == jnp.bfloat16


def test_batch_not_divisible_by_groups_is_a_clear_error():
  with pytest.raises(ValueError, match='not divisible by 3 BN groups'):
    fused_batch_norm.group_statistics(jnp.zeros((4, 2, 2, 1)), 3)


class _UnfusedConv4Block(nn.Module):
  """The textbook block: nn.Conv with bias, BN, then relu and max-pool applied apart."""

  @nn.compact
  def __call__(self, x, train):
    x = nn.Conv(8, (3, 3), padding=((1, 1), (1, 1)), name='Conv_0')(x)
    x = models.GroupedBatchNorm(use_running_average=not train, num_groups=2,
                                name='GroupedBatchNorm_0')(x)
    return max_pool.max_pool_2x2(nn.relu(x))


class _FusedConv4Block(nn.Module):
  """Conv4's block: the norm's activation, which XLA's kernel set runs as one fused op."""

  @nn.compact
  def __call__(self, x, train):
    x = nn.Conv(8, (3, 3), padding=((1, 1), (1, 1)), name='Conv_0')(x)
    return models.GroupedBatchNorm(use_running_average=not train, num_groups=2,
                                   activation=max_pool.relu_max_pool_2x2,
                                   name='GroupedBatchNorm_0')(x)


def test_conv4_block_with_fused_activation_equals_the_unfused_block():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(4, 9, 9, 3)), jnp.float32)
  variables = _UnfusedConv4Block().init(jax.random.PRNGKey(0), x, train=True)
  params = jax.tree_util.tree_map(
      lambda p: p + jnp.asarray(rng.normal(size=p.shape) * 0.3, jnp.float32),
      variables['params'])  # a nonzero conv bias, which the running mean must see
  variables = {'params': params, 'batch_stats': variables['batch_stats']}
  results = {}
  for name, block in [('unfused', _UnfusedConv4Block()), ('fused', _FusedConv4Block())]:
    out, updates = block.apply(variables, x, train=True, mutable=['batch_stats'])
    eval_out = block.apply({'params': params, 'batch_stats': updates['batch_stats']}, x,
                           train=False)
    grads = jax.grad(lambda p, block=block: block.apply(
        {'params': p, 'batch_stats': variables['batch_stats']}, x, train=True,
        mutable=['batch_stats'])[0].sum())(params)
    results[name] = (out, updates['batch_stats'], eval_out, grads)
  # The fused block runs the one custom_vjp op (batch_norm_relu_max_pool); the unfused has none.
  jaxprs = {name: str(jax.make_jaxpr(lambda v, block=block: block.apply(
      v, x, train=True, mutable=['batch_stats']))(variables))
            for name, block in [('unfused', _UnfusedConv4Block()), ('fused', _FusedConv4Block())]}
  assert 'custom_vjp_call' in jaxprs['fused'] and 'custom_vjp_call' not in jaxprs['unfused']
  for want, got in zip(results['unfused'], results['fused']):
    jax.tree_util.tree_map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-4),
                           got, want)
  # BN cancels the conv bias in training: its gradient is float noise.
  assert np.abs(np.asarray(results['fused'][3]['Conv_0']['bias'])).max() < 1e-4


@pytest.mark.parametrize('activation', [None, jax.nn.relu, jnp.tanh])
def test_grouped_batch_norm_applies_the_activations_it_does_not_fuse(activation):
  """`activation` follows BN (statistics per group), whatever the function."""
  x = np.random.default_rng(4).normal(size=(4, 3, 3, 5)).astype(np.float32) * 2 + 1
  scale = np.linspace(0.5, 1.5, 5).astype(np.float32)
  bias = np.linspace(-0.2, 0.2, 5).astype(np.float32)
  out, mean, var = fused_batch_norm.grouped_batch_norm(x, scale, bias, 2, EPS, activation)
  for group in range(2):
    part = x[2 * group:2 * group + 2]
    normalised = (part - part.mean((0, 1, 2))) / np.sqrt(part.var((0, 1, 2)) + EPS) * scale + bias
    want = {None: normalised, jax.nn.relu: np.maximum(normalised, 0)}.get(
        activation, np.tanh(normalised))
    np.testing.assert_allclose(out[2 * group:2 * group + 2], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mean[group], part.mean((0, 1, 2)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var[group], part.var((0, 1, 2)), rtol=1e-5, atol=1e-6)
