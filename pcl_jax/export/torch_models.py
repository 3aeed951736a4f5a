"""The PyTorch modules an exported encoder loads into (`torch_names` gives their state dicts).

- ResNet-18/34/50: torchvision's own model, `torchvision.models.resnet18(num_classes=dim)`, with
  `fc` as MoCo's builder makes it when `mlp` (`Sequential(Linear, ReLU, Linear)`: `fc.0`,
  `fc.2`) and, for `small_stem`, a 3x3 stride-1 `conv1` and no max-pool. torchvision's ResNets
  are 64 wide, so only `model.width=64` ResNets export.
- Conv4: `Conv4` here, 4 x (conv 3x3 with bias, BatchNorm, ReLU, 2x2 max-pool), flattened in
  PyTorch's (c, h, w) order, then the same head.
Each returns the head output; pcl_jax's features are it L2-normalised
(`torch.nn.functional.normalize`).
"""

import torch
from torch import nn
import torchvision

from pcl_jax.export import torch_names


def _head(in_features: int, dim: int, mlp: bool) -> nn.Module:
  out = nn.Linear(in_features, dim)
  return nn.Sequential(nn.Linear(in_features, in_features), nn.ReLU(), out) if mlp else out


class Conv4Block(nn.Module):
  """conv 3x3 (bias) -> BatchNorm -> ReLU -> 2x2 max-pool."""

  def __init__(self, in_channels: int, out_channels: int):
    super().__init__()
    self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
    self.bn = nn.BatchNorm2d(out_channels)

  def forward(self, x):
    return nn.functional.max_pool2d(nn.functional.relu(self.bn(self.conv(x))), 2)


class Conv4(nn.Module):
  """pcl_jax's Conv4 encoder in PyTorch: NCHW images -> the head output [B, dim]."""

  def __init__(self, width: int, dim: int, mlp: bool, map_side: int):
    super().__init__()
    self.blocks = nn.Sequential(*[Conv4Block(3 if i == 0 else width, width) for i in range(4)])
    self.fc = _head(width * map_side * map_side, dim, mlp)

  def forward(self, x):
    return self.fc(torch.flatten(self.blocks(x), 1))


def build(spec: dict) -> nn.Module:
  """The PyTorch module of an encoder.json `spec` (arch, width, small_stem, mlp, dim,
  image_size), in eval mode, with fresh weights: load the exported state dict into it.

  Raises:
    ValueError: a ResNet of another width than torchvision's 64.
  """
  arch, dim, mlp = spec['arch'], int(spec['dim']), bool(spec['mlp'])
  torch_names.check_exportable(arch, spec['width'])
  if arch == 'conv4':
    module = Conv4(int(spec['width']), dim, mlp, torch_names.conv4_map_side(spec['image_size']))
  else:
    module = getattr(torchvision.models, arch)(num_classes=dim)
    if mlp:
      module.fc = _head(module.fc.in_features, dim, True)
    if spec['small_stem']:
      module.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
      module.maxpool = nn.Identity()
  return module.eval()
