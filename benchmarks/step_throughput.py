r"""Images/s of the jitted PCL/MoCo train step versus an equivalent PyTorch MoCo step, same process.

  python benchmarks/step_throughput.py            # ResNet-18 32 px b64 and Conv4 84 px b64
  python benchmarks/step_throughput.py --quick    # tiny smoke version

Both sides do the same work per step: momentum update of the key encoder, key forward (train-mode
BN), query forward + backward, InfoNCE against a queue of r negatives, SGD (momentum, weight
decay), enqueue. The PyTorch side is what a PyTorch user would run on this machine: eager mode,
all cores, and the faster of NCHW and channels-last (both are timed). Prints images/s of each
and the JAX/PyTorch ratio (>= 1.0 means JAX is at least as fast).
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np
import torch
from torch import nn
import torchvision

from configs import default
from pcl_jax import models
from pcl_jax import state as state_lib
from pcl_jax import train


def _jax_step_images_per_s(arch, image_size, batch, width, small_stem, num_negatives, steps,
                           warmup, dtype, bn_groups):
  config = default.get_config()
  config.model.arch, config.model.width, config.model.small_stem = arch, width, small_stem
  config.train.dtype = dtype
  config.pcl.num_negatives = num_negatives
  model = models.encoder_from_config(config, bn_groups=bn_groups)
  schedule = train.make_lr_schedule(config.optim, 10, 100)
  tx = train.make_optimizer(config.optim, schedule)
  state = state_lib.create_state(jax.random.PRNGKey(0), model, tx, image_size, num_negatives)
  step = train.make_train_step(config, model, tx, schedule)
  bank = train.empty_prototype_bank(1, 8, config.model.dim, 1024)
  hparams = {'smoothing': jnp.float32(0.0)}
  rng = np.random.default_rng(0)
  batch_np = {'im_q': rng.normal(size=(batch, image_size, image_size, 3)).astype(np.float32),
              'im_k': rng.normal(size=(batch, image_size, image_size, 3)).astype(np.float32),
              'index': np.arange(batch)}
  # Batches arrive from the host each step, as in training.
  for _ in range(warmup):
    state, metrics = step(state, batch_np, bank, hparams)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = step(state, batch_np, bank, hparams)
  jax.block_until_ready(metrics)
  return batch * steps / (time.perf_counter() - start)


class TorchConv4(nn.Module):
  """Conv4 as pcl_jax.models.Conv4Backbone, with a linear head."""

  def __init__(self, width, dim, image_size):
    super().__init__()
    layers, channels = [], 3
    for _ in range(4):
      layers += [nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                 nn.MaxPool2d(2)]
      channels = width
    self.features = nn.Sequential(*layers)
    side = image_size
    for _ in range(4):
      side //= 2
    self.fc = nn.Linear(width * side * side, dim)

  def forward(self, x):
    return self.fc(torch.flatten(self.features(x), 1))


def _torch_encoder(arch, width, dim, image_size, small_stem):
  if arch == 'conv4':
    return TorchConv4(width, dim, image_size)
  net = getattr(torchvision.models, arch)(num_classes=dim)
  if small_stem:
    net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    net.maxpool = nn.Identity()
  return net


def _torch_step_images_per_s(arch, image_size, batch, width, small_stem, num_negatives, steps,
                             warmup, channels_last, bf16):
  torch.manual_seed(0)
  dim = 128
  encoder_q = _torch_encoder(arch, width, dim, image_size, small_stem)
  encoder_k = _torch_encoder(arch, width, dim, image_size, small_stem)
  encoder_k.load_state_dict(encoder_q.state_dict())
  for p in encoder_k.parameters():
    p.requires_grad = False
  memory_format = torch.channels_last if channels_last else torch.contiguous_format
  encoder_q = encoder_q.to(memory_format=memory_format)
  encoder_k = encoder_k.to(memory_format=memory_format)
  queue = nn.functional.normalize(torch.randn(num_negatives, dim), dim=1)
  optimizer = torch.optim.SGD(encoder_q.parameters(), lr=0.03, momentum=0.9, weight_decay=1e-4)
  im_q = torch.randn(batch, 3, image_size, image_size).to(memory_format=memory_format)
  im_k = torch.randn(batch, 3, image_size, image_size).to(memory_format=memory_format)
  ptr = 0

  def one_step():
    nonlocal queue, ptr
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=bf16):
      with torch.no_grad():
        for pk, pq in zip(encoder_k.parameters(), encoder_q.parameters()):
          pk.mul_(0.999).add_(pq.detach(), alpha=0.001)
        permutation = torch.randperm(batch)
        k = nn.functional.normalize(encoder_k(im_k[permutation]).float(), dim=1)
        k = k[torch.argsort(permutation)]
      q = nn.functional.normalize(encoder_q(im_q).float(), dim=1)
      l_pos = (q * k).sum(1, keepdim=True)
      l_neg = q @ queue.t()
      logits = torch.cat([l_pos, l_neg], 1) / 0.2
      loss = nn.functional.cross_entropy(logits, torch.zeros(batch, dtype=torch.long))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    queue[ptr:ptr + batch] = k
    ptr = (ptr + batch) % num_negatives

  encoder_q.train()
  encoder_k.train()
  for _ in range(warmup):
    one_step()
  start = time.perf_counter()
  for _ in range(steps):
    one_step()
  return batch * steps / (time.perf_counter() - start)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--quick', action='store_true', help='tiny smoke version')
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--warmup', type=int, default=3)
  parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  parser.add_argument('--bn-groups', type=int, default=4, help='JAX shuffle-BN groups')
  parser.add_argument('--jax-only', action='store_true', help='skip the PyTorch reference')
  parser.add_argument('--case', choices=['resnet18', 'conv4'], help='run one case only')
  args = parser.parse_args()
  cases = [('resnet18', 32, 64, 64, True), ('conv4', 84, 64, 64, False)]
  if args.case:
    cases = [c for c in cases if c[0] == args.case]
  steps, warmup = args.steps, args.warmup
  if args.quick:
    cases = [('conv4', 32, 16, 16, False)]
    steps, warmup = 3, 1
  print(f'jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} '
        f'({torch.get_num_threads()} threads), {os.cpu_count()} CPUs, dtype {args.dtype}')
  print(f"{'case':<28}{'jax img/s':>11}{'torch NCHW':>12}{'torch CL':>10}{'ratio':>8}")
  for arch, size, batch, width, small_stem in cases:
    common = dict(arch=arch, image_size=size, batch=batch, width=width, small_stem=small_stem,
                  num_negatives=batch * 10, steps=steps, warmup=warmup)
    jax_ips = _jax_step_images_per_s(dtype=args.dtype, bn_groups=args.bn_groups, **common)
    name = f'{arch} {size}px b{batch}'
    if args.jax_only:
      print(f'{name:<28}{jax_ips:>11.1f}', flush=True)
      continue
    bf16 = args.dtype == 'bfloat16'
    torch_nchw = _torch_step_images_per_s(channels_last=False, bf16=bf16, **common)
    torch_cl = _torch_step_images_per_s(channels_last=True, bf16=bf16, **common)
    best = max(torch_nchw, torch_cl)
    print(f'{name:<28}{jax_ips:>11.1f}{torch_nchw:>12.1f}{torch_cl:>10.1f}{jax_ips / best:>8.2f}',
          flush=True)


if __name__ == '__main__':
  main()
