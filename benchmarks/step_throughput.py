r"""Images/s of the jitted PCL/MoCo train step versus an equivalent PyTorch MoCo step, same process.

  python benchmarks/step_throughput.py            # ResNet-18 32 px b64 and Conv4 84 px b64
  python benchmarks/step_throughput.py --quick    # tiny smoke version

Both sides do the same work per step: momentum update of the key encoder, key forward (train-mode
BN), query forward + backward, InfoNCE against a queue of r negatives, SGD (momentum, weight
decay), enqueue. The JAX step is timed with both convolution kernels (`model.conv_impl`): xla
(XLA's own) and torch (PyTorch's oneDNN kernels through `pcl_jax.cpu_conv`, what `auto` picks
on one CPU device). The PyTorch side is what a PyTorch user would run on this machine: eager
mode, all cores, and the faster of NCHW and channels-last (both are timed). Both run in this
process, so both get `pcl_jax.host_memory`'s allocator settings (run with PCL_JAX_TUNE_MALLOC=0
to see both without). Prints images/s of each and the ratio of the JAX step `auto` runs to the
faster PyTorch one (>= 1.0 means JAX is at least as fast).
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pcl_jax first: host_memory tunes malloc before jax starts its threads.
import pcl_jax  # pylint: disable=g-import-not-at-top,unused-import
import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np
import torch

from benchmarks import torch_reference

from configs import default  # pylint: disable=g-import-not-at-top
from pcl_jax import models
from pcl_jax import parallel
from pcl_jax import state as state_lib
from pcl_jax import train


def _jax_step_images_per_s(arch, image_size, batch, width, small_stem, num_negatives, steps,
                           warmup, dtype, bn_groups, conv_impl):
  config = default.get_config()
  config.model.arch, config.model.width, config.model.small_stem = arch, width, small_stem
  config.model.conv_impl = conv_impl
  config.train.dtype = dtype
  config.pcl.num_negatives = num_negatives
  model = models.encoder_from_config(config, bn_groups=bn_groups)
  schedule = train.make_lr_schedule(config.optim, 10, 100)
  tx = train.make_optimizer(config.optim, schedule)
  state = state_lib.create_state(jax.random.PRNGKey(0), model, tx, image_size, num_negatives)
  state = jax.device_put(state, parallel.replicated(parallel.data_mesh()))  # as Trainer places it
  step = train.make_train_step(config, model, tx, schedule)
  bank = train.empty_prototype_bank(1, 8, config.model.dim, 1024)
  hparams = {'smoothing': jnp.float32(0.0)}
  rng = np.random.default_rng(0)
  batch_np = {'im_q': rng.normal(size=(batch, image_size, image_size, 3)).astype(np.float32),
              'im_k': rng.normal(size=(batch, image_size, image_size, 3)).astype(np.float32),
              'index': np.arange(batch)}
  # Batches arrive from the host each step, as in training. Warm-up also lets the heap reach its
  # steady state (host_memory): the first steps still grow it.
  for _ in range(warmup):
    state, metrics = step(state, batch_np, bank, hparams)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = step(state, batch_np, bank, hparams)
  jax.block_until_ready(metrics)
  return batch * steps / (time.perf_counter() - start)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--quick', action='store_true', help='tiny smoke version')
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--warmup', type=int, default=5)
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
    steps, warmup = 3, 2
  print(f'jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} '
        f'({torch.get_num_threads()} threads), {os.cpu_count()} CPUs, dtype {args.dtype}')
  print(f"{'case':<22}{'jax torch-conv':>15}{'jax xla-conv':>13}{'torch NCHW':>12}"
        f"{'torch CL':>10}{'ratio':>7}")
  for arch, size, batch, width, small_stem in cases:
    common = dict(arch=arch, image_size=size, batch=batch, width=width, small_stem=small_stem,
                  num_negatives=batch * 10, steps=steps, warmup=warmup)
    jax_ips = {impl: _jax_step_images_per_s(dtype=args.dtype, bn_groups=args.bn_groups,
                                            conv_impl=impl, **common)
               for impl in ('torch', 'xla')}
    name = f'{arch} {size}px b{batch}'
    row = f"{name:<22}{jax_ips['torch']:>15.1f}{jax_ips['xla']:>13.1f}"
    if args.jax_only:
      print(row, flush=True)
      continue
    bf16 = args.dtype == 'bfloat16'
    torch_nchw = torch_reference.torch_step_images_per_s(channels_last=False, bf16=bf16, **common)
    torch_cl = torch_reference.torch_step_images_per_s(channels_last=True, bf16=bf16, **common)
    ratio = jax_ips['torch'] / max(torch_nchw, torch_cl)
    print(f'{row}{torch_nchw:>12.1f}{torch_cl:>10.1f}{ratio:>7.2f}', flush=True)

if __name__ == '__main__':
  main()
