"""max_pool: values and gradients equal PyTorch's max_pool2d and a numpy loop, ties included."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from pcl_jax import kernels
from pcl_jax.kernels import max_pool
from pcl_jax.kernels.onednn import library as onednn_library
from pcl_jax.kernels.onednn import max_pool as onednn_max_pool
from pcl_jax import models

ONEDNN, ONEDNN_WHY_NOT = onednn_library.available()
needs_onednn = pytest.mark.skipif(not ONEDNN, reason=f'onednn unavailable: {ONEDNN_WHY_NOT}')


def _numpy_max_pool(x, out_grad, window, stride, padding):
  """Loops: each output takes its window's first maximum (row-major) and sends its gradient
  there."""
  batch, height, width, channels = x.shape
  padded = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)),
                  constant_values=-np.inf)
  out_h = (height + 2 * padding - window) // stride + 1
  out_w = (width + 2 * padding - window) // stride + 1
  pooled = np.empty((batch, out_h, out_w, channels), x.dtype)
  grad = np.zeros(padded.shape, np.float64)
  for b in range(batch):
    for c in range(channels):
      for oy in range(out_h):
        for ox in range(out_w):
          patch = padded[b, stride * oy:stride * oy + window, stride * ox:stride * ox + window, c]
          dy, dx = np.unravel_index(np.argmax(patch), patch.shape)  # argmax: first maximum
          pooled[b, oy, ox, c] = patch[dy, dx]
          grad[b, stride * oy + dy, stride * ox + dx, c] += out_grad[b, oy, ox, c]
  return pooled, grad[:, padding:padding + height, padding:padding + width]


def _ours(x, out_grad, window, stride, padding, impl='jax'):
  """max_pool's pool, or (impl 'onednn') onednn_max_pool's custom calls."""
  module = onednn_max_pool if impl == 'onednn' else max_pool
  pool = lambda x: module.max_pool(x, window, stride, padding)
  pooled, vjp = jax.vjp(jax.jit(pool), jnp.asarray(x))
  return np.asarray(pooled), np.asarray(vjp(jnp.asarray(out_grad))[0])


def _torch(x, out_grad, window, stride, padding):
  x = torch.from_numpy(x).permute(0, 3, 1, 2).requires_grad_()
  pooled = torch.nn.functional.max_pool2d(x, window, stride, padding)
  pooled.backward(torch.from_numpy(out_grad).permute(0, 3, 1, 2))
  return (pooled.detach().permute(0, 2, 3, 1).numpy(), x.grad.permute(0, 2, 3, 1).numpy())


def _inputs(shape, window, stride, padding, seed=0):
  """Rounded values after a ReLU: many ties, inside windows and across overlapping ones."""
  rng = np.random.default_rng(seed)
  x = np.maximum(np.round(rng.normal(size=shape) * 2) / 2, 0).astype(np.float32)
  out = [(size + 2 * padding - window) // stride + 1 for size in shape[1:3]]
  out_grad = rng.normal(size=(shape[0], *out, shape[3])).astype(np.float32)
  return x, out_grad


@pytest.mark.parametrize('shape,window,stride,padding', [
    ((2, 10, 10, 3), 3, 2, 1),   # ResNet's stem pool, even size
    ((2, 9, 11, 2), 3, 2, 1),    # odd sizes, non-square
    ((1, 7, 7, 2), 2, 2, 0),     # non-overlapping
    ((1, 8, 8, 2), 3, 1, 1),     # stride 1: nine windows share each pixel
    ((1, 11, 9, 2), 5, 3, 2),    # window wider than twice the stride
    ((1, 9, 9, 1), 3, 3, 0),
])
@pytest.mark.parametrize('impl', ['jax', pytest.param('onednn', marks=needs_onednn)])
def test_matches_torch_and_a_numpy_loop(shape, window, stride, padding, impl):
  x, out_grad = _inputs(shape, window, stride, padding)
  assert (x == 0).mean() > 0.3  # the ties that the first-max rule decides
  if impl == 'onednn' and not onednn_max_pool.supported(jnp.asarray(x), window, stride, padding):
    pytest.skip('floor mode leaves a negative bottom/right padding: the model uses max_pool')
  pooled, grad = _ours(x, out_grad, window, stride, padding, impl)
  want_pooled, want_grad = _numpy_max_pool(x, out_grad, window, stride, padding)
  torch_pooled, torch_grad = _torch(x, out_grad, window, stride, padding)
  np.testing.assert_array_equal(pooled, want_pooled)
  np.testing.assert_array_equal(pooled, torch_pooled)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(grad, torch_grad, rtol=1e-6, atol=1e-6)


def test_nan_wins_its_windows_as_in_torch():
  x, out_grad = _inputs((1, 6, 6, 1), 3, 2, 1, seed=1)
  x[0, 2, 3, 0] = np.nan
  pooled, grad = _ours(x, out_grad, 3, 2, 1)
  torch_pooled, torch_grad = _torch(x, out_grad, 3, 2, 1)
  np.testing.assert_array_equal(pooled, torch_pooled)  # NaN where torch has NaN
  np.testing.assert_allclose(grad, torch_grad, rtol=1e-6)


def test_bfloat16_pools_in_bfloat16():
  x = jnp.asarray(_inputs((1, 8, 8, 2), 3, 2, 1)[0], jnp.bfloat16)
  pooled = max_pool.max_pool(x, 3, 2, 1)
  assert pooled.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(pooled, np.float32),
                                _numpy_max_pool(np.asarray(x, np.float32),
                                                np.zeros((1, 4, 4, 2), np.float32), 3, 2, 1)[0])


@pytest.mark.parametrize('window,stride,padding', [(3, 2, 2), (0, 1, 0), (3, 0, 1), (12, 1, 0)])
def test_bad_arguments_are_a_clear_error(window, stride, padding):
  with pytest.raises(ValueError, match=f'max_pool\\(window={window}, stride={stride}'):
    max_pool.max_pool(jnp.zeros((1, 16, 16, 1)), window, stride, padding)


@pytest.mark.parametrize('size', [8, 21])
def test_max_pool_2x2_matches_flax_max_pool_and_torch_floor_mode(size):
  """Conv4's pool (`max_pool_2x2`, and after a ReLU `relu_max_pool_2x2`, the norm's activation)."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  x = np.random.default_rng(0).normal(size=(2, size, size, 3)).astype(np.float32)
  pooled = max_pool.max_pool_2x2(x)
  np.testing.assert_array_equal(pooled, nn.max_pool(x, (2, 2), (2, 2)))
  reference = torch.nn.functional.max_pool2d(torch.from_numpy(x).permute(0, 3, 1, 2), 2)
  np.testing.assert_array_equal(pooled, reference.permute(0, 2, 3, 1).numpy())
  reference = torch.nn.functional.max_pool2d(torch.relu(torch.from_numpy(x)).permute(0, 3, 1, 2), 2)
  np.testing.assert_array_equal(max_pool.relu_max_pool_2x2(x),
                                reference.permute(0, 2, 3, 1).numpy())


@needs_onednn
def test_onednn_pool_takes_what_floor_mode_allows():
  """`supported`: float32 NHWC whose last window starts inside the input; the rest (a 7-wide
  input pooled 2/2 drops a column, bfloat16) stays on max_pool."""
  assert onednn_max_pool.supported(jnp.zeros((1, 42, 42, 4)), 3, 2, 1)
  assert not onednn_max_pool.supported(jnp.zeros((1, 7, 7, 4)), 2, 2, 0)
  assert not onednn_max_pool.supported(jnp.zeros((1, 8, 8, 4), jnp.bfloat16), 3, 2, 1)


# The pool's numerics are tested above; this is the whole-encoder wiring.
@pytest.mark.slow
@needs_onednn
def test_resnet_stem_pool_runs_on_onednn_with_conv_impl_onednn():
  images = jnp.ones((2, 32, 32, 3))
  for conv_impl, expected in (('onednn', True), ('xla', False)):
    model = models.create_encoder('resnet18', dim=4, width=4, kernels=kernels.select(conv_impl))
    variables = model.init(jax.random.PRNGKey(0), images, train=False)
    grad = jax.jit(jax.grad(lambda p, model=model, variables=variables: model.apply(
        {'params': p, 'batch_stats': variables['batch_stats']}, images, train=True,
        mutable=['batch_stats'])[0].sum()))
    text = grad.lower(variables['params']).as_text()
    assert ('pcl_onednn_max_pool_forward' in text) == expected
    assert ('pcl_onednn_max_pool_backward' in text) == expected
