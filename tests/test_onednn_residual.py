"""A residual block's join, relu(y + shortcut), as oneDNN custom calls, against numpy.

The whole-encoder check (conv_impl=onednn, these with oneDNN's convolutions and batch norms,
against XLA) is test_torch_conv's encoder test.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pcl_jax import kernels
from pcl_jax.kernels.onednn import library as onednn_library
from pcl_jax.kernels.onednn import residual as onednn_residual
from pcl_jax import models

AVAILABLE, WHY_NOT = onednn_library.available()
pytestmark = pytest.mark.skipif(not AVAILABLE, reason=f'onednn unavailable: {WHY_NOT}')


def _inputs(shape, seed=0):
  """y, shortcut, out_grad; a quarter of the sums exactly zero (ReLU's kink: gradient 0)."""
  rng = np.random.default_rng(seed)
  y, shortcut, out_grad = (rng.normal(size=shape).astype(np.float32) for _ in range(3))
  kink = rng.random(shape) < 0.25
  shortcut[kink] = -y[kink]
  return y, shortcut, out_grad


def _numpy_join(y, shortcut, out_grad):
  """(out, d y = d shortcut) in float64."""
  total = y.astype(np.float64) + shortcut
  return np.maximum(total, 0.0), out_grad * (total > 0)


@pytest.mark.parametrize('shape', [(4, 5, 5, 12), (2, 3, 3, 7), (3, 17)])
def test_forward_and_gradients_match_numpy(shape):
  y, shortcut, out_grad = _inputs(shape)
  out, vjp = jax.vjp(jax.jit(onednn_residual.add_relu), y, shortcut)
  assert 'pcl_onednn_residual_forward' in jax.jit(onednn_residual.add_relu).lower(
      y, shortcut).as_text()
  y_grad, shortcut_grad = vjp(jnp.asarray(out_grad))
  want_out, want_grad = _numpy_join(y, shortcut, out_grad)
  np.testing.assert_allclose(out, want_out, rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(y_grad, want_grad.astype(np.float32))
  np.testing.assert_array_equal(shortcut_grad, want_grad.astype(np.float32))


def test_operand_still_read_after_the_join_keeps_its_value():
  """The forward writes over `y`'s buffer (input_output_aliases): where the step still reads
  `y` afterwards, XLA must copy it first, and both results stay right."""
  y, shortcut, out_grad = _inputs((4, 6, 6, 8), seed=1)

  @jax.jit
  def both(y, shortcut):
    return onednn_residual.add_relu(y, shortcut), y * 2.0

  out, doubled = both(y, shortcut)
  np.testing.assert_allclose(out, _numpy_join(y, shortcut, out_grad)[0], rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(doubled, y * 2.0)


def test_supported_only_for_float32_of_one_shape():
  x = jnp.ones((2, 4, 4, 8))
  assert onednn_residual.supported(x, x)
  assert not onednn_residual.supported(x.astype(jnp.bfloat16), x.astype(jnp.bfloat16))
  assert not onednn_residual.supported(x, jnp.ones((2, 4, 4, 1)))


@pytest.mark.parametrize('arch,joins', [('resnet18', 8),
                                        pytest.param('resnet50', 16, marks=pytest.mark.slow)])
def test_onednn_encoder_joins_every_block_on_onednn(arch, joins):
  """Every residual block's join is one custom call with conv_impl=onednn (its gradient XLA's
  ops); none with conv_impl=xla."""
  images = jnp.ones((4, 8, 8, 3))
  for conv_impl, want in (('onednn', joins), ('xla', 0)):
    model = models.create_encoder(arch, dim=8, small_stem=True, width=8, kernels=kernels.select(conv_impl))
    variables = model.init(jax.random.PRNGKey(0), images, train=False)

    def loss(params, variables=variables, model=model):
      out, _ = model.apply({**variables, 'params': params}, images, train=True,
                           mutable=['batch_stats'])
      return out.sum()

    text = jax.jit(jax.grad(loss)).lower(variables['params']).as_text()
    assert text.count('pcl_onednn_residual_forward') == want
