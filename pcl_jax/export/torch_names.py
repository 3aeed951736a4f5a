"""An encoder's variables as a PyTorch state dict and back: names and layouts, numpy only.

This module owns the correspondence between pcl_jax's Flax parameter tree (`models`) and the
PyTorch modules a user loads it into (`torch_models`):
- ResNets: torchvision's names (`conv1`, `bn1`, `layer{s}.{b}.conv{j}` / `bn{j}` /
  `downsample.0` / `downsample.1`, `fc`); the MLP head is `fc.0` and `fc.2`, as MoCo's builder
  makes it;
- Conv4: `blocks.{i}.conv`, `blocks.{i}.bn` and the same head (`torch_models.Conv4`).
Layouts: a Flax conv kernel is HWIO, a torch weight OIHW; a Dense kernel is [in, out], a Linear
weight [out, in]; BatchNorm's scale, bias, mean and var are torch's weight, bias, running_mean and
running_var (plus torchvision's `num_batches_tracked`, which pcl_jax's momentum BN never reads:
exported as 0). Conv4 flattens its last feature map: Flax in (h, w, c) order, torch in (c, h, w),
so the first head weight's input axis is permuted on the way. Pure functions of numpy arrays.
"""

from typing import Dict, Iterator, Tuple

import numpy as np

RESNET_STAGES = {'resnet18': (2, 2, 2, 2), 'resnet34': (3, 4, 6, 3), 'resnet50': (3, 4, 6, 3)}


def check_exportable(arch: str, width: int) -> None:
  """Raises ValueError (naming the setting) for an encoder no PyTorch module here takes:
  torchvision's ResNets are 64 wide."""
  if arch != 'conv4' and int(width) != 64:
    raise ValueError(f"model.width={width}: torchvision's ResNets are 64 wide, so only width-64 "
                     'ResNets export (Conv4 exports at any width)')


def conv4_map_side(image_size: int) -> int:
  """The side of Conv4's last feature map: four 2x2 max-pools (floor), from `image_size`."""
  side = int(image_size)
  for _ in range(4):
    side //= 2
  return side


def _modules(arch: str, mlp: bool) -> Iterator[Tuple[Tuple[str, ...], str, str]]:
  """(Flax module path under the encoder, torch prefix, kind) of every layer with variables;
  kind is 'conv', 'conv_bias' (a conv with a bias), 'bn' or 'dense'."""
  if arch == 'conv4':
    for i in range(4):
      yield ('backbone', f'Conv_{i}'), f'blocks.{i}.conv', 'conv_bias'
      yield ('backbone', f'GroupedBatchNorm_{i}'), f'blocks.{i}.bn', 'bn'
  elif arch in RESNET_STAGES:
    yield ('backbone', 'stem_conv'), 'conv1', 'conv'
    yield ('backbone', 'stem_bn'), 'bn1', 'bn'
    block_name = 'Bottleneck' if arch == 'resnet50' else 'BasicBlock'
    convs = 3 if arch == 'resnet50' else 2
    index = 0
    for stage, num_blocks in enumerate(RESNET_STAGES[arch]):
      for block in range(num_blocks):
        flax_block = ('backbone', f'{block_name}_{index}')
        torch_block = f'layer{stage + 1}.{block}'
        for j in range(convs):
          yield flax_block + (f'Conv_{j}',), f'{torch_block}.conv{j + 1}', 'conv'
          yield flax_block + (f'GroupedBatchNorm_{j}',), f'{torch_block}.bn{j + 1}', 'bn'
        # A projection shortcut where the block changes the shape: the first block of every
        # stage but a basic block's first stage (torchvision's rule).
        if block == 0 and (stage > 0 or arch == 'resnet50'):
          yield flax_block + ('downsample_conv',), f'{torch_block}.downsample.0', 'conv'
          yield flax_block + ('downsample_bn',), f'{torch_block}.downsample.1', 'bn'
        index += 1
  else:
    raise ValueError(f'model.arch={arch!r} cannot be exported; use one of conv4, '
                     f'{", ".join(RESNET_STAGES)}')
  if mlp:
    yield ('head_hidden',), 'fc.0', 'dense'
    yield ('head_out',), 'fc.2', 'dense'
  else:
    yield ('head_out',), 'fc', 'dense'


def _get(tree: dict, path: Tuple[str, ...]) -> dict:
  for name in path:
    tree = tree[name]
  return tree


def _set(tree: dict, path: Tuple[str, ...], values: dict) -> None:
  for name in path[:-1]:
    tree = tree.setdefault(name, {})
  tree[path[-1]] = values


def _flatten_order_permutation(side: int, channels: int) -> np.ndarray:
  """Index i of torch's (c, h, w) flattening -> the same feature's index in Flax's (h, w, c)."""
  c, h, w = np.meshgrid(np.arange(channels), np.arange(side), np.arange(side), indexing='ij')
  return ((h * side + w) * channels + c).reshape(-1)


def to_torch(variables: dict, arch: str, mlp: bool, image_size: int) -> Dict[str, np.ndarray]:
  """{'params', 'batch_stats'} of one encoder -> a float32 torch state dict (numpy values).

  Raises:
    KeyError: the variables lack a layer the architecture has (another `model.*` setting).
  """
  params, stats = variables['params'], variables['batch_stats']
  state = {}
  first_dense = True
  for path, prefix, kind in _modules(arch, mlp):
    layer = _get(params, path)
    if kind in ('conv', 'conv_bias'):
      state[f'{prefix}.weight'] = np.transpose(np.asarray(layer['kernel']), (3, 2, 0, 1))
      if kind == 'conv_bias':
        state[f'{prefix}.bias'] = np.asarray(layer['bias'])
    elif kind == 'bn':
      running = _get(stats, path)
      state[f'{prefix}.weight'] = np.asarray(layer['scale'])
      state[f'{prefix}.bias'] = np.asarray(layer['bias'])
      state[f'{prefix}.running_mean'] = np.asarray(running['mean'])
      state[f'{prefix}.running_var'] = np.asarray(running['var'])
      state[f'{prefix}.num_batches_tracked'] = np.zeros((), np.int64)
    else:
      weight = np.asarray(layer['kernel']).T
      if arch == 'conv4' and first_dense:
        side = conv4_map_side(image_size)
        weight = weight[:, _flatten_order_permutation(side, weight.shape[1] // side**2)]
      state[f'{prefix}.weight'] = weight
      state[f'{prefix}.bias'] = np.asarray(layer['bias'])
      first_dense = False
  # Own C-ordered copies (np.array keeps 0-d tensors 0-d), writable for torch.from_numpy.
  return {name: np.array(value, np.int64 if value.dtype == np.int64 else np.float32, order='C')
          for name, value in state.items()}


def from_torch(state: Dict[str, np.ndarray], arch: str, mlp: bool, image_size: int) -> dict:
  """The inverse of `to_torch`: a torch state dict (numpy values) -> {'params', 'batch_stats'}.

  Raises:
    KeyError: naming the first torch tensor the architecture needs and `state` lacks.
  """
  params, stats = {}, {}
  first_dense = True

  def tensor(name):
    if name not in state:
      raise KeyError(name)
    return np.asarray(state[name], np.float32)

  for path, prefix, kind in _modules(arch, mlp):
    if kind in ('conv', 'conv_bias'):
      layer = {'kernel': np.transpose(tensor(f'{prefix}.weight'), (2, 3, 1, 0))}
      if kind == 'conv_bias':
        layer['bias'] = tensor(f'{prefix}.bias')
      _set(params, path, layer)
    elif kind == 'bn':
      _set(params, path, {'scale': tensor(f'{prefix}.weight'), 'bias': tensor(f'{prefix}.bias')})
      _set(stats, path, {'mean': tensor(f'{prefix}.running_mean'),
                         'var': tensor(f'{prefix}.running_var')})
    else:
      weight = tensor(f'{prefix}.weight')
      if arch == 'conv4' and first_dense:
        side = conv4_map_side(image_size)
        inverse = np.argsort(_flatten_order_permutation(side, weight.shape[1] // side**2))
        weight = weight[:, inverse]
      _set(params, path, {'kernel': np.ascontiguousarray(weight.T),
                          'bias': tensor(f'{prefix}.bias')})
      first_dense = False
  return {'params': params, 'batch_stats': stats}
