"""Encoder shapes, parameter counts against torchvision, grouped BN against numpy, bf16 compute."""

import flax
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torchvision

from pcl_jax import models


def _param_count(tree):
  return sum(leaf.size for leaf in jax.tree_util.tree_leaves(tree))


@pytest.mark.parametrize('arch', ['resnet18', 'resnet50'])
def test_resnet_parameter_count_matches_torchvision(arch):
  model = models.create_encoder(arch, dim=128)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((2, 64, 64, 3)))
  torch_model = getattr(torchvision.models, arch)(num_classes=128)
  assert _param_count(shapes['params']) == sum(p.numel() for p in torch_model.parameters())


def test_resnet34_parameter_count_matches_torchvision():
  model = models.create_encoder('resnet34', dim=128, mlp=True)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((2, 64, 64, 3)))
  torch_model = torchvision.models.resnet34(num_classes=128)
  # MLP head: an extra 512x512 hidden layer (MoCo v2), as the reference inserts before fc.
  expected = sum(p.numel() for p in torch_model.parameters()) + 512 * 512 + 512
  assert _param_count(shapes['params']) == expected


def test_conv_kernels_are_flax_hwio_with_torchvisions_shapes():
  """Every kernel is a torchvision weight [O,I,H,W] as flax's nn.Conv keeps it, [H,W,I,O]; the
  ResNet's convolutions have no bias, as torchvision's."""
  model = models.create_encoder('resnet18', dim=128)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((2, 64, 64, 3)))
  ours = sorted(leaf.shape for leaf in jax.tree_util.tree_leaves(shapes['params'])
                if leaf.ndim == 4)
  torch_model = torchvision.models.resnet18(num_classes=128)
  theirs = sorted((h, w, i, o) for o, i, h, w in (p.shape for p in torch_model.parameters()
                                                   if p.ndim == 4))
  assert ours == theirs
  flat = flax.traverse_util.flatten_dict(shapes['params'])
  conv_modules = {names[:-1] for names, leaf in flat.items() if leaf.ndim == 4}
  assert len(conv_modules) == len(theirs)
  for module in conv_modules:
    assert {names[-1] for names in flat if names[:-1] == module} == {'kernel'}


def test_conv4_parameter_tree_is_nn_convs_and_batch_norms():
  """Conv4's tree is what flax's nn.Conv (with bias) and the norm name: kernel HWIO, bias [C]."""
  params = jax.eval_shape(models.create_encoder('conv4', dim=16, width=8).init,
                          jax.random.PRNGKey(0), jnp.zeros((2, 32, 32, 3)))['params']['backbone']
  for i in range(4):
    conv = params[f'Conv_{i}']
    assert set(conv) == {'kernel', 'bias'}
    assert conv['kernel'].shape == (3, 3, 3 if i == 0 else 8, 8) and conv['bias'].shape == (8,)
    assert set(params[f'GroupedBatchNorm_{i}']) == {'scale', 'bias'}


def test_conv4_initialises_as_pytorchs_conv2d():
  """Conv4's kernels and biases: uniform within 1/sqrt(fan_in), as nn.Conv2d's defaults."""
  # Jitted: one compilation instead of one per op.
  params = jax.jit(models.create_encoder('conv4', dim=16, width=64).init)(
      jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))['params']['backbone']
  for i, fan_in in enumerate([27, 576, 576, 576]):
    bound = 1 / np.sqrt(fan_in)
    for leaf in (params[f'Conv_{i}']['kernel'], params[f'Conv_{i}']['bias']):
      leaf = np.asarray(leaf)
      assert np.abs(leaf).max() <= bound and np.abs(leaf).max() > 0.9 * bound
      assert abs(leaf.std() - bound / np.sqrt(3)) < 0.2 * bound


def test_conv4_parameter_count():
  model = models.create_encoder('conv4', dim=16, width=64)
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((2, 84, 84, 3)))
  # 4 conv layers (3x3, bias) + BN scale/bias, then a linear head from 64*5*5 features.
  convs = (3 * 9 * 64 + 64) + 3 * (64 * 9 * 64 + 64) + 4 * 2 * 64
  assert _param_count(variables['params']) == convs + 64 * 5 * 5 * 16 + 16


@pytest.mark.parametrize('arch,size,small_stem', [('conv4', 84, False), ('resnet18', 32, True),
                                                  ('resnet18', 64, False)])
def test_output_is_unit_norm_with_backbone_features(arch, size, small_stem):
  model = models.create_encoder(arch, dim=8, width=8, small_stem=small_stem)
  x = jax.random.normal(jax.random.PRNGKey(1), (4, size, size, 3))
  # Jitted: one compilation each instead of one per op (half the time of a ResNet eagerly).
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)
  embedding, backbone = jax.jit(functools.partial(model.apply, train=False,
                                                  return_backbone=True))(variables, x)
  assert embedding.shape == (4, 8) and embedding.dtype == jnp.float32
  np.testing.assert_allclose(np.linalg.norm(embedding, axis=1), 1.0, rtol=1e-5)
  assert backbone.shape[0] == 4


def test_grouped_batchnorm_matches_numpy_per_group():
  x = np.random.default_rng(0).normal(size=(8, 3, 3, 5)).astype(np.float32) * 3 + 1
  bn = models.GroupedBatchNorm(use_running_average=False, num_groups=2)
  variables = bn.init(jax.random.PRNGKey(0), x)
  out, updated = bn.apply(variables, x, mutable=['batch_stats'])
  for group in range(2):
    part = x[4 * group:4 * (group + 1)]
    mean, var = part.mean((0, 1, 2)), part.var((0, 1, 2))
    np.testing.assert_allclose(out[4 * group:4 * (group + 1)],
                               (part - mean) / np.sqrt(var + 1e-5), atol=1e-4)
  # Running stats as PyTorch: 0.9 * old + 0.1 * (mean over groups; unbiased variance).
  count = 4 * 3 * 3
  group_means = np.stack([x[:4].mean((0, 1, 2)), x[4:].mean((0, 1, 2))])
  group_vars = np.stack([x[:4].var((0, 1, 2)), x[4:].var((0, 1, 2))])
  np.testing.assert_allclose(updated['batch_stats']['mean'], 0.1 * group_means.mean(0),
                             rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(updated['batch_stats']['var'],
                             0.9 + 0.1 * group_vars.mean(0) * count / (count - 1), rtol=1e-4)


def test_grouped_batchnorm_groups_are_independent():
  x = np.random.default_rng(1).normal(size=(8, 2, 2, 3)).astype(np.float32)
  bn = models.GroupedBatchNorm(use_running_average=False, num_groups=2)
  variables = bn.init(jax.random.PRNGKey(0), x)
  out_a, _ = bn.apply(variables, x, mutable=['batch_stats'])
  changed = x.copy()
  changed[4:] *= 10.0  # only the second group changes
  out_b, _ = bn.apply(variables, changed, mutable=['batch_stats'])
  np.testing.assert_allclose(out_a[:4], out_b[:4], atol=1e-6)


def test_bfloat16_computes_in_bf16_with_float32_params():
  model = models.create_encoder('conv4', dim=8, width=8, dtype=jnp.bfloat16)
  x = jnp.ones((2, 16, 16, 3))
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(variables))
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
  assert 'bf16' in apply.lower(variables, x).as_text()
  assert apply(variables, x).dtype == jnp.float32


def test_unknown_arch_is_a_clear_error():
  with pytest.raises(ValueError, match='model.arch'):
    models.create_encoder('vgg11')


def test_grouped_batchnorm_eval_applies_its_activation_to_the_running_normalisation():
  """Evaluation: activation((x - running mean) / sqrt(running var + eps) * scale + bias)."""
  x = np.random.default_rng(2).normal(size=(2, 3, 3, 4)).astype(np.float32)
  bn = models.GroupedBatchNorm(use_running_average=True, activation=jnp.tanh)
  stats = {'mean': np.array([0.5, -1.0, 0.0, 2.0], np.float32),
           'var': np.array([1.0, 4.0, 0.25, 9.0], np.float32)}
  params = {'scale': np.array([1.0, 0.5, 2.0, 1.5], np.float32),
            'bias': np.array([0.0, 0.1, -0.1, 0.3], np.float32)}
  out = bn.apply({'params': params, 'batch_stats': stats}, x)
  want = np.tanh((x - stats['mean']) / np.sqrt(stats['var'] + 1e-5) * params['scale']
                 + params['bias'])
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
