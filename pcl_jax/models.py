"""Flax encoders: Conv4, ResNet-18/34/50, the projection head, and grouped (shuffle-)BatchNorm.

This module owns network architecture only: no losses, no optimizer, no data. Every encoder maps
NHWC images to L2-normalised float32 embeddings `[B, dim]`; with `return_backbone=True` it also
returns the pooled backbone features (what `eval.feature_layer=backbone` evaluates). Parameters
are always float32; `dtype` sets the compute dtype (bfloat16 for mixed precision).

BatchNorm computes its training statistics per group of `bn_groups` consecutive samples, as if
each group sat on its own device: that is how a single device emulates MoCo's shuffle-BN
(the key batch is permuted before it enters the key encoder, see `step.py`).

The layers are flax.linen's own, in their own layouts: every convolution is an `nn.Conv` (HWIO
`kernel`, and `bias` for the Conv4's), so a checkpoint's parameter tree is the one any Flax
model has. Which kernels compute the convolutions, batch norms, stem pool and residual joins is
not the model's concern: `pcl_jax.kernels.select(runtime.conv_impl)` chooses a `Kernels` set,
the encoder receives it (`kernels=`) and hands it to the layers at one seam each:
`nn.Conv(conv_general_dilated=kernels.conv)`, and `GroupedBatchNorm`, whose `activation` (a
plain function such as `nn.relu`) the set's `batch_norm` fuses where it can. A kernel that wants
another weight layout converts inside `pcl_jax.kernels`. Parameters and outputs are the same
under every set. This module imports no torch.
"""

import functools
import math
from typing import Any, Callable, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from pcl_jax import configuration
from pcl_jax import kernels as kernels_lib
from pcl_jax.kernels import max_pool

ARCHS = configuration.ARCHS
# The `model.*` settings that make a network (and a checkpoint's parameter tree): a checkpoint
# resumes or evaluates only under the same values.
IDENTITY_FIELDS = ('arch', 'dim', 'mlp', 'small_stem', 'width')

# torchvision's initialisers, so parameter statistics match the PyTorch reference: its ResNets'
# convolutions (kaiming normal, fan-out) and every nn.Linear (kaiming uniform, a=sqrt(5): uniform
# within 1/sqrt(fan_in)).
conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
dense_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')
# PyTorch's own nn.Conv2d initialisation, which a plain Conv4 (the reference's and the few-shot
# literature's) keeps: kernel and bias uniform within 1/sqrt(fan_in). Its kernels have ~1/6 the
# variance of `conv_init`'s, and under BN a smaller weight norm means a larger effective step.
torch_conv_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


def l2_normalize(x, axis: int = -1, eps: float = 1e-12):
  """x / max(||x||, eps) along `axis`, as torch.nn.functional.normalize: zero rows stay zero
  (as faiss's fvec_renorm_L2 leaves them). The encoder's output, and what the clustering and the
  evaluation apply to centroids and features."""
  norm = jnp.sqrt(jnp.sum(x * x, axis=axis, keepdims=True))
  return x / jnp.maximum(norm, eps)


def torch_conv_bias_init(fan_in: int):
  """nn.Conv2d's default bias: uniform within 1/sqrt(fan_in)."""
  bound = 1.0 / math.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound,
                                                                  bound)


class GroupedBatchNorm(nn.Module):
  """BatchNorm with batch statistics per group of consecutive samples, then `activation`.

  Running statistics follow PyTorch (momentum 0.1 on the new value, unbiased variance) so a
  converted reference checkpoint behaves the same. With `num_groups=1` this is plain BatchNorm.
  `activation` (None, `nn.relu`, `kernels.max_pool.relu_max_pool_2x2`, or any function of the
  normalised output) follows the normalisation. In training, the kernel set's `batch_norm`
  computes the statistics and applies the activation, fusing those it knows; in evaluation the
  activation is applied as it is.
  """
  use_running_average: bool
  num_groups: int = 1
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Any = jnp.float32
  zero_scale: bool = False
  activation: Optional[Callable] = None
  kernels: kernels_lib.Kernels = None  # None: XLA's

  @nn.compact
  def __call__(self, x):
    features = x.shape[-1]
    running_mean = self.variable('batch_stats', 'mean', jnp.zeros, (features,), jnp.float32)
    running_var = self.variable('batch_stats', 'var', jnp.ones, (features,), jnp.float32)
    scale_init = nn.initializers.zeros if self.zero_scale else nn.initializers.ones
    scale = self.param('scale', scale_init, (features,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (features,), jnp.float32)

    if self.use_running_average:
      inv = jax.lax.rsqrt(running_var.value + self.epsilon) * scale
      shift = bias - running_mean.value * inv
      out = (x * inv.astype(x.dtype) + shift.astype(x.dtype)).astype(self.dtype)
      return out if self.activation is None else self.activation(out)

    out, mean, var = _kernels(self.kernels).batch_norm(x, scale, bias, self.num_groups,
                                                       self.epsilon, self.activation)
    if not self.is_initializing():
      count = x.size // (self.num_groups * features)
      unbiased = var.mean(0) * count / max(count - 1, 1)
      running_mean.value = self.momentum * running_mean.value + (1 - self.momentum) * mean.mean(0)
      running_var.value = self.momentum * running_var.value + (1 - self.momentum) * unbiased
    return out.astype(self.dtype)


def _kernels(kernels) -> kernels_lib.Kernels:
  return kernels_lib.select('xla') if kernels is None else kernels


def _pad(size: int) -> Tuple[Tuple[int, int], Tuple[int, int]]:
  """PyTorch-style symmetric padding for a square kernel."""
  return ((size // 2, size // 2), (size // 2, size // 2))


class _ResidualBlock(nn.Module):
  """What the ResNet blocks share: their fields, the projection shortcut and the join
  relu(y + shortcut) (`kernels.residual_join`)."""
  filters: int
  strides: int
  conv: Any
  norm: Any
  kernels: kernels_lib.Kernels = None

  def _add_shortcut(self, x, y):
    """relu(y + shortcut(x)); a strided 1x1 conv + BN when shapes differ (torchvision's)."""
    if x.shape != y.shape:
      x = self.conv(y.shape[-1], (1, 1), (self.strides, self.strides), padding='VALID',
                    name='downsample_conv')(x)
      x = self.norm(name='downsample_bn')(x)
    return _kernels(self.kernels).residual_join(y, x)


class BasicBlock(_ResidualBlock):
  """ResNet basic block (ResNet-18/34)."""
  expansion = 1

  @nn.compact
  def __call__(self, x):
    y = self.conv(self.filters, (3, 3), (self.strides, self.strides), padding=_pad(3))(x)
    y = self.norm(activation=nn.relu)(y)
    y = self.conv(self.filters, (3, 3), padding=_pad(3))(y)
    return self._add_shortcut(x, self.norm()(y))


class Bottleneck(_ResidualBlock):
  """ResNet bottleneck block (ResNet-50), stride on the 3x3 conv as torchvision v1.5."""
  expansion = 4

  @nn.compact
  def __call__(self, x):
    y = self.norm(activation=nn.relu)(self.conv(self.filters, (1, 1), padding='VALID')(x))
    y = self.conv(self.filters, (3, 3), (self.strides, self.strides), padding=_pad(3))(y)
    y = self.norm(activation=nn.relu)(y)
    y = self.norm()(self.conv(self.filters * 4, (1, 1), padding='VALID')(y))
    return self._add_shortcut(x, y)


class ResNetBackbone(nn.Module):
  """ResNet trunk up to global average pooling."""
  stage_sizes: Sequence[int]
  block: Any
  width: int = 64
  small_stem: bool = False
  bn_groups: int = 1
  dtype: Any = jnp.float32
  kernels: kernels_lib.Kernels = None

  @nn.compact
  def __call__(self, x, train: bool):
    kernels = _kernels(self.kernels)
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype, kernel_init=conv_init,
                             conv_general_dilated=kernels.conv)
    norm = functools.partial(GroupedBatchNorm, use_running_average=not train,
                             num_groups=self.bn_groups, dtype=self.dtype, kernels=kernels)
    x = x.astype(self.dtype)
    if self.small_stem:
      x = conv(self.width, (3, 3), padding=_pad(3), name='stem_conv')(x)
      x = norm(name='stem_bn', activation=nn.relu)(x)
    else:
      x = conv(self.width, (7, 7), (2, 2), padding=_pad(7), name='stem_conv')(x)
      x = norm(name='stem_bn', activation=nn.relu)(x)
      x = kernels.max_pool(x, 3, 2, 1)
    for stage, num_blocks in enumerate(self.stage_sizes):
      for block in range(num_blocks):
        strides = 2 if stage > 0 and block == 0 else 1
        x = self.block(self.width * 2**stage, strides, conv, norm, kernels)(x)
    return x.mean(axis=(1, 2))


class Conv4Backbone(nn.Module):
  """The few-shot standard Conv4: 4 x (conv3x3 with bias, BN, ReLU, max-pool 2), flattened.

  Initialised as PyTorch's nn.Conv2d (`torch_conv_init`, `torch_conv_bias_init`), as the Conv4
  of the reference. BN + ReLU + pool is one activation of the norm, which the kernel set fuses
  (`kernels.fused_batch_norm`)."""
  width: int = 64
  bn_groups: int = 1
  dtype: Any = jnp.float32
  kernels: kernels_lib.Kernels = None

  @nn.compact
  def __call__(self, x, train: bool):
    kernels = _kernels(self.kernels)
    x = x.astype(self.dtype)
    for i in range(4):
      x = nn.Conv(self.width, (3, 3), padding=_pad(3), dtype=self.dtype,
                  kernel_init=torch_conv_init,
                  bias_init=torch_conv_bias_init(3 * 3 * x.shape[-1]),
                  conv_general_dilated=kernels.conv, name=f'Conv_{i}')(x)
      x = GroupedBatchNorm(use_running_average=not train, num_groups=self.bn_groups,
                           dtype=self.dtype, activation=max_pool.relu_max_pool_2x2,
                           kernels=kernels, name=f'GroupedBatchNorm_{i}')(x)
    return x.reshape((x.shape[0], -1))


class Encoder(nn.Module):
  """Backbone + linear or 2-layer MLP head; returns L2-normalised float32 embeddings."""
  backbone: nn.Module
  dim: int = 128
  mlp: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = True, return_backbone: bool = False):
    features = self.backbone(x, train=train)
    dense = functools.partial(nn.Dense, dtype=self.dtype, kernel_init=dense_init)
    y = features
    if self.mlp:
      y = nn.relu(dense(features.shape[-1], name='head_hidden')(y))
    y = dense(self.dim, name='head_out')(y).astype(jnp.float32)
    embedding = l2_normalize(y)
    if return_backbone:
      return embedding, features.astype(jnp.float32)
    return embedding


def create_encoder(arch: str, *, dim: int = 128, mlp: bool = False, small_stem: bool = False,
                   width: int = 64, bn_groups: int = 1, dtype: Any = jnp.float32,
                   kernels: kernels_lib.Kernels = None) -> Encoder:
  """Builds the encoder named by `model.arch`.

  `kernels` (default XLA's, see `pcl_jax.kernels.select`) picks how the convolutions, batch
  norms, stem pool and residual joins are computed, never the parameters; results agree to
  float rounding.
  """
  if arch == 'conv4':
    backbone = Conv4Backbone(width=width, bn_groups=bn_groups, dtype=dtype, kernels=kernels)
  elif arch in ('resnet18', 'resnet34', 'resnet50'):
    stages = {'resnet18': (2, 2, 2, 2), 'resnet34': (3, 4, 6, 3), 'resnet50': (3, 4, 6, 3)}[arch]
    block = Bottleneck if arch == 'resnet50' else BasicBlock
    backbone = ResNetBackbone(stages, block, width=width, small_stem=small_stem,
                              bn_groups=bn_groups, dtype=dtype, kernels=kernels)
  else:
    raise ValueError(f'model.arch={arch!r} is unknown; use one of {", ".join(ARCHS)}')
  return Encoder(backbone=backbone, dim=dim, mlp=mlp, dtype=dtype)


def encoder_from_config(config, bn_groups: int = 1) -> Encoder:
  """Builds the encoder of a full config (`model`, `train.dtype`, and `runtime.conv_impl` for
  the kernels, resolved on this machine: it depends on the devices, so it is checked here
  rather than in configuration.validate)."""
  dtype = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}[config.train.dtype]
  return create_encoder(config.model.arch, dim=config.model.dim, mlp=config.model.mlp,
                        small_stem=config.model.small_stem, width=config.model.width,
                        bn_groups=bn_groups, dtype=dtype,
                        kernels=kernels_lib.select(config.runtime.conv_impl))
