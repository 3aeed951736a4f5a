"""runtime.conv_impl=onednn: oneDNN convolutions as XLA custom calls, against XLA's convolutions.

The whole-encoder check runs in test_torch_conv, beside the torch path's.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pcl_jax import kernels
from pcl_jax.kernels.onednn import conv as onednn_conv
from pcl_jax.kernels.onednn import library as onednn_library

AVAILABLE, WHY_NOT = onednn_library.available()
needs_onednn = pytest.mark.skipif(not AVAILABLE, reason=f'onednn conv unavailable: {WHY_NOT}')


def _xla(images, kernel, stride, padding):
  return jax.lax.conv_general_dilated(images, kernel, (stride, stride), [(padding, padding)] * 2,
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                      precision='highest')


def _loss(conv, images, kernel):
  out = conv(images, kernel)
  return jnp.sum(out * jnp.sin(out))  # a non-constant output gradient


@needs_onednn
@pytest.mark.parametrize('shape,features,kernel,stride,padding', [
    ((2, 9, 9, 3), 8, 3, 1, 1),     # odd size, 3 input channels (a first layer)
    ((2, 10, 10, 8), 16, 3, 2, 1),  # strided 3x3
    ((2, 10, 10, 8), 16, 1, 2, 0),  # ResNet's 1x1 downsample
    ((2, 16, 16, 3), 8, 7, 2, 3),   # ResNet's 7x7 stem
    ((3, 3, 3, 512), 512, 3, 1, 1),  # ResNet's last stage at 84 px: blocked activations
    ((2, 4, 4, 512), 512, 3, 1, 1),  # ... at 32 px: blocked for the input gradient only
])
def test_forward_and_both_gradients_match_xla(shape, features, kernel, stride, padding):
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=shape), jnp.float32)
  weights = jnp.asarray(rng.normal(size=(kernel, kernel, shape[-1], features)), jnp.float32)
  ours = lambda x, w: onednn_conv.onednn_conv(x, w, (stride, stride), (padding, padding))
  xla = lambda x, w: _xla(x, w, stride, padding)
  want = xla(images, weights)  # outputs grow with the channels: tolerance relative to them
  np.testing.assert_allclose(jax.jit(ours)(images, weights), want, rtol=1e-5,
                             atol=max(1e-4, 1e-5 * float(jnp.max(jnp.abs(want)))))
  got = jax.jit(jax.value_and_grad(lambda x, w: _loss(ours, x, w), (0, 1)))(images, weights)
  want = jax.value_and_grad(lambda x, w: _loss(xla, x, w), (0, 1))(images, weights)
  for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-3 * float(jnp.max(jnp.abs(w))))


def test_blocked_layout_only_for_wide_convolutions_on_small_maps():
  """The fixed rule (see `onednn_conv.blocked_layout`), and the custom calls carrying it."""
  assert onednn_conv.blocked_layout((96, 3, 3, 512), (3, 3, 512, 512), (1, 1)) == (True, True)
  assert onednn_conv.blocked_layout((64, 4, 4, 512), (3, 3, 512, 512), (1, 1)) == (False, True)
  for images, kernel, stride in (((64, 8, 8, 512), (3, 3, 512, 512), (1, 1)),
                                 ((64, 8, 8, 256), (3, 3, 256, 512), (2, 2)),
                                 ((64, 4, 4, 256), (3, 3, 256, 256), (1, 1)),
                                 ((64, 3, 3, 512), (1, 1, 512, 2048), (1, 1)),
                                 ((64, 3, 3, 512), (3, 3, 512, 256), (1, 1))):
    assert onednn_conv.blocked_layout(images, kernel, stride) == (False, False)
  if AVAILABLE:
    images, weights = jnp.ones((2, 3, 3, 512)), jnp.ones((3, 3, 512, 512))
    text = jax.jit(lambda x, w: onednn_conv.onednn_conv(x, w, (1, 1), (1, 1))).lower(
        images, weights).as_text()
    assert 'blocked_forward = true' in text


@needs_onednn
def test_kernel_gradient_alone_when_the_images_are_data():
  """jax.grad over the kernel only takes the d-kernel-only custom call; it equals XLA's."""
  rng = np.random.default_rng(1)
  images = jnp.asarray(rng.normal(size=(2, 12, 12, 4)), jnp.float32)
  weights = jnp.asarray(rng.normal(size=(3, 3, 4, 6)), jnp.float32)
  ours = lambda w: _loss(lambda x, k: onednn_conv.onednn_conv(x, k, (1, 1), (1, 1)), images, w)
  grad = jax.jit(jax.grad(ours))
  assert 'pcl_onednn_backward_kernel' in grad.lower(weights).as_text()
  np.testing.assert_allclose(grad(weights),
                             jax.grad(lambda w: _loss(lambda x, k: _xla(x, k, 1, 1), images, w))(
                                 weights), rtol=1e-4, atol=1e-3)


@needs_onednn
def test_bfloat16_goes_to_the_torch_path():
  images = jnp.ones((2, 8, 8, 4), jnp.bfloat16)
  weights = jnp.ones((3, 3, 4, 4), jnp.bfloat16)
  conv = lambda x, w: onednn_conv.conv_general_dilated(
      x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  text = jax.jit(conv).lower(images, weights).as_text()
  assert 'pcl_onednn' not in text
  np.testing.assert_allclose(np.asarray(jax.jit(conv)(images, weights), np.float32),
                             np.asarray(_xla(images, weights, 1, 1), np.float32))


@needs_onednn
def test_flax_conv_runs_on_onednn_and_other_kernel_layouts_fall_back():
  """nn.Conv's call (HWIO, its dimension numbers) takes the custom call; an OHWI kernel, which
  the custom calls do not take, goes to the torch path with the same result."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(2)
  images = jnp.asarray(rng.normal(size=(2, 7, 7, 3)), jnp.float32)
  layer = nn.Conv(5, (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                  conv_general_dilated=onednn_conv.conv_general_dilated)
  variables = layer.init(jax.random.PRNGKey(0), images)
  apply = jax.jit(layer.apply)
  assert 'pcl_onednn_forward' in apply.lower(variables, images).as_text()
  want = _xla(images, variables['params']['kernel'], 1, 1)
  np.testing.assert_allclose(apply(variables, images), want, rtol=1e-5, atol=1e-5)
  ohwi = jnp.transpose(variables['params']['kernel'], (3, 0, 1, 2))
  conv = jax.jit(lambda x, w: onednn_conv.conv_general_dilated(
      x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=('NHWC', 'OHWI', 'NHWC')))
  assert 'pcl_onednn' not in conv.lower(images, ohwi).as_text()
  np.testing.assert_allclose(conv(images, ohwi), want, rtol=1e-5, atol=1e-5)


def test_missing_onednn_is_a_clear_error(monkeypatch):
  monkeypatch.setattr(onednn_library, '_onednn_prefix', lambda: None)
  with pytest.raises(ValueError, match=r'runtime.conv_impl=onednn cannot run here.*pip install '
                                       r'onednn-cpu-gomp'):
    kernels.resolve('onednn')
