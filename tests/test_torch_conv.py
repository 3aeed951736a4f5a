"""kernels.torch_conv and the kernel sets: PyTorch-kernel convolutions in jitted JAX agree with
XLA's, values and gradients."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pcl_jax import configuration
from pcl_jax import kernels
from pcl_jax.kernels.onednn import library as onednn_library
from pcl_jax.kernels import torch_conv
from pcl_jax import models

from configs import test as test_config

NHWC = ('NHWC', 'HWIO', 'NHWC')


def _lax(x, w, stride, padding):
  return jax.lax.conv_general_dilated(x, w, stride, padding, dimension_numbers=NHWC,
                                      precision=jax.lax.Precision.HIGHEST)


def _torch(x, w, stride, padding):
  return torch_conv.conv_general_dilated(x, w, stride, padding, dimension_numbers=NHWC)


def _loss_and_grads(conv, x, w, stride, padding, cotangent):
  def loss(x, w):
    return jnp.sum(conv(x, w, stride, padding) * cotangent)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(x, w)


@pytest.mark.parametrize('shape,kernel,stride,padding', [
    ((3, 9, 9, 3), (3, 3, 3, 8), (1, 1), ((1, 1), (1, 1))),      # first layer, odd size
    ((2, 10, 10, 8), (3, 3, 8, 16), (2, 2), ((1, 1), (1, 1))),   # strided 3x3
    ((2, 8, 8, 8), (1, 1, 8, 16), (2, 2), 'VALID'),              # projection shortcut
    ((2, 16, 12, 4), (7, 7, 4, 8), (2, 2), ((3, 3), (3, 3))),    # ResNet stem, non-square image
    ((2, 6, 6, 4), (3, 3, 4, 4), (1, 1), 'SAME'),
])
def test_forward_and_gradients_match_xla(shape, kernel, stride, padding):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  w = jnp.asarray(rng.normal(size=kernel), jnp.float32)
  want = _lax(x, w, stride, padding)
  got = jax.jit(_torch, static_argnums=(2, 3))(x, w, stride, padding)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
  cotangent = jnp.asarray(rng.normal(size=want.shape), jnp.float32)
  want_loss, (want_dx, want_dw) = _loss_and_grads(_lax, x, w, stride, padding, cotangent)
  got_loss, (got_dx, got_dw) = _loss_and_grads(_torch, x, w, stride, padding, cotangent)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
  np.testing.assert_allclose(got_dx, want_dx, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(got_dw, want_dw, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize('shape,kernel,stride,padding', [
    ((3, 9, 9, 3), (3, 3, 3, 8), (1, 1), ((1, 1), (1, 1))),      # first layer: d kernel alone
    ((2, 8, 8, 8), (1, 1, 8, 16), (2, 2), 'VALID'),              # window read from OHWI
    ((2, 7, 7, 4), (3, 3, 4, 6), (2, 2), 'SAME'),
])
def test_ohwi_kernels_match_xla_on_the_same_hwio_kernel(shape, kernel, stride, padding):
  """An OHWI kernel (a channels-last PyTorch weight's bytes) gives the HWIO kernel's outputs and
  gradients."""
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  w = jnp.asarray(rng.normal(size=kernel), jnp.float32)
  w_ohwi = jnp.transpose(w, (3, 0, 1, 2))
  ohwi = lambda x, w, stride, padding: torch_conv.conv_general_dilated(
      x, w, stride, padding, dimension_numbers=('NHWC', 'OHWI', 'NHWC'))
  want = _lax(x, w, stride, padding)
  cotangent = jnp.asarray(rng.normal(size=want.shape), jnp.float32)
  want_loss, (want_dx, want_dw) = _loss_and_grads(_lax, x, w, stride, padding, cotangent)
  got_loss, (got_dx, got_dw) = _loss_and_grads(ohwi, x, w_ohwi, stride, padding, cotangent)
  np.testing.assert_allclose(jax.jit(ohwi, static_argnums=(2, 3))(x, w_ohwi, stride, padding),
                             want, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
  np.testing.assert_allclose(got_dx, want_dx, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(jnp.transpose(got_dw, (1, 2, 3, 0)), want_dw, rtol=1e-5, atol=1e-3)


def test_numpy_reference_of_a_single_output():
  """Independent of both libraries: one output value and one kernel gradient by hand."""
  rng = np.random.default_rng(1)
  x = rng.normal(size=(1, 5, 5, 2)).astype(np.float32)
  w = rng.normal(size=(3, 3, 2, 3)).astype(np.float32)
  y = np.asarray(_torch(jnp.asarray(x), jnp.asarray(w), (2, 2), ((1, 1), (1, 1))))
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  # output (1, 2) at stride 2 reads padded rows 2..4, columns 4..6
  np.testing.assert_allclose(y[0, 1, 2], np.einsum('hwi,hwio->o', padded[0, 2:5, 4:7], w),
                             rtol=1e-5)
  # d sum(y[..., 0]) / d w[h, w, i, 0] = sum of the input patches that output channel 0 saw
  dw = jax.grad(lambda w: _torch(jnp.asarray(x), w, (2, 2), ((1, 1), (1, 1)))[..., 0].sum())(
      jnp.asarray(w))
  patches = sum(padded[0, 2 * i:2 * i + 3, 2 * j:2 * j + 3] for i in range(3) for j in range(3))
  np.testing.assert_allclose(dw[..., 0], patches, rtol=1e-4, atol=1e-5)


def test_bfloat16_matches_xla_to_bf16_precision():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(2, 8, 8, 8)), jnp.bfloat16)
  w = jnp.asarray(rng.normal(size=(3, 3, 8, 8)), jnp.bfloat16)
  got = jax.jit(_torch, static_argnums=(2, 3))(x, w, (1, 1), ((1, 1), (1, 1)))
  assert got.dtype == jnp.bfloat16
  want = _lax(x.astype(jnp.float32), w.astype(jnp.float32), (1, 1), ((1, 1), (1, 1)))
  np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=0.05, atol=0.3)


def test_unsupported_cases_fall_back_to_xla():
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(1, 6, 6, 4)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32)
  cases = [dict(padding=((0, 1), (1, 0))),  # asymmetric padding
           dict(padding='VALID', rhs_dilation=(2, 2)),
           dict(padding='SAME', feature_group_count=2)]
  for case in cases:
    kernel = w if case.get('feature_group_count') == 2 else jnp.concatenate([w, w], axis=2)
    got = torch_conv.conv_general_dilated(x, kernel, (1, 1), dimension_numbers=NHWC, **case)
    want = jax.lax.conv_general_dilated(x, kernel, (1, 1), dimension_numbers=NHWC, **case)
    np.testing.assert_array_equal(got, want)
    assert 'buffer_callback' not in str(jax.make_jaxpr(
        lambda x, k, case=case: torch_conv.conv_general_dilated(
            x, k, (1, 1), dimension_numbers=NHWC, **case))(x, kernel))


_ONEDNN_AVAILABLE, _ONEDNN_WHY_NOT = onednn_library.available()


_NEEDS_ONEDNN = pytest.mark.skipif(not _ONEDNN_AVAILABLE,
                                   reason=f'onednn conv unavailable: {_ONEDNN_WHY_NOT}')


@pytest.mark.parametrize('arch,size,host_impl,small_stem', [
    ('conv4', 16, 'torch', True), ('resnet18', 16, 'torch', True),
    pytest.param('resnet18', 16, 'onednn', True, marks=_NEEDS_ONEDNN),
    # The 7x7 stem and its 3x3/2 pool (oneDNN's pooling); 64 px leaves layer4 2x2, since BN
    # statistics over 1x1 maps of 2 samples amplify rounding past the tolerance.
    pytest.param('resnet18', 64, 'onednn', False, marks=_NEEDS_ONEDNN)])
def test_encoder_train_step_gradients_match_xla(arch, size, host_impl, small_stem):
  """The whole encoder on host kernels (torch, or oneDNN's custom calls: convolutions, BN +
  ReLU, the stem pool): embeddings, BN statistics and parameter gradients agree with XLA's
  ops."""
  rng = np.random.default_rng(4)
  images = jnp.asarray(rng.normal(size=(4, size, size, 3)), jnp.float32)
  results = {}
  for impl in ('xla', host_impl):
    model = models.create_encoder(arch, dim=8, small_stem=small_stem, width=8, bn_groups=2,
                                  kernels=kernels.select(impl))
    variables = model.init(jax.random.PRNGKey(0), images, train=False)

    def loss(params, model=model, variables=variables):
      out, new_vars = model.apply({'params': params, 'batch_stats': variables['batch_stats']},
                                  images, train=True, mutable=['batch_stats'])
      return jnp.sum(out[:, 0] - out[:, 1] ** 2), new_vars
    results[impl] = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables['params'])
  (xla_loss, xla_vars), xla_grads = results['xla']
  (host_loss, host_vars), host_grads = results[host_impl]
  np.testing.assert_allclose(host_loss, xla_loss, rtol=1e-4)
  for want, got in zip(jax.tree_util.tree_leaves((xla_vars, xla_grads)),
                       jax.tree_util.tree_leaves((host_vars, host_grads))):
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-4)


def test_the_first_layers_image_gradient_is_not_computed(monkeypatch):
  """Layers 2-4 compute (d images, d kernel) in one call; layer 1, fed with data, d kernel only."""
  calls = []
  original = torch_conv._backward_host  # pylint: disable=protected-access
  def recording(*args, images_too, **kwargs):
    calls.append((images_too, tuple(args[3].shape)))
    original(*args, images_too=images_too, **kwargs)
  monkeypatch.setattr(torch_conv, '_backward_host', recording)
  model = models.create_encoder('conv4', dim=4, width=4, kernels=kernels.select('torch'))
  images = jnp.ones((2, 16, 16, 3))
  variables = model.init(jax.random.PRNGKey(0), images, train=False)
  grad = jax.jit(jax.grad(lambda p: model.apply(
      {'params': p, 'batch_stats': variables['batch_stats']}, images, train=False).sum()))
  jax.block_until_ready(grad(variables['params']))
  assert sorted(calls) == sorted([(False, (2, 16, 16, 3))]
                                 + [(True, (2, size, size, 4)) for size in (8, 4, 2)])


def test_auto_resolves_to_host_kernels_on_one_cpu_device(monkeypatch):
  """auto: oneDNN's custom calls where they build, else PyTorch's kernels."""
  expected = 'onednn' if onednn_library.available(build=True)[0] else 'torch'
  assert kernels.resolve('auto') == expected
  monkeypatch.setattr(onednn_library, '_compiler', lambda: None)
  assert kernels.resolve('auto') == 'torch'
  assert kernels.resolve('xla') == 'xla'
  with pytest.raises(ValueError, match='runtime.conv_impl=.*unknown'):
    kernels.resolve('cudnn')


def test_config_rejects_unknown_conv_impl():
  config = test_config.get_config()
  config.runtime.conv_impl = 'cudnn'
  with pytest.raises(configuration.UserError, match='runtime.conv_impl'):
    configuration.validate(config)


def test_torch_on_several_devices_is_a_clear_error():
  """With 2 (fake) CPU devices: auto falls back to xla, an explicit torch names the fix."""
  code = ('from configs import test; from pcl_jax import models, configuration\n'
          'c = test.get_config(); print(models.encoder_from_config(c).backbone.kernels.name)\n'
          'c.runtime.conv_impl = "torch"\n'
          'try:\n  models.encoder_from_config(c)\n'
          'except configuration.UserError as e:\n  print("ERROR", e)\n')
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2',
             JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env,
                       cwd=os.path.dirname(os.path.dirname(__file__)), check=True).stdout
  lines = out.strip().splitlines()
  assert lines[0] == 'xla'
  assert lines[1].startswith('ERROR runtime.conv_impl=torch cannot run here')
  assert '2 cpu device(s)' in lines[1] and 'runtime.conv_impl=auto' in lines[1]
