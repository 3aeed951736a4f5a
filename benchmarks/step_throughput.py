r"""Images/s of the jitted PCL/MoCo train step versus an equivalent PyTorch MoCo step, one run.

  python benchmarks/step_throughput.py            # ResNet-18 32 px b64 and Conv4 84 px b64
  python benchmarks/step_throughput.py --quick    # tiny smoke version

Both sides do the same work per step: momentum update of the key encoder, key forward (train-mode
BN), query forward + backward, InfoNCE against a queue of r negatives, SGD (momentum, weight
decay), enqueue. The JAX step is timed with `runtime.conv_impl=auto` (on one CPU device: oneDNN
custom calls, `pcl_jax/kernels/onednn/`, where they build) and with each host or XLA kernel:
torch (PyTorch's oneDNN kernels through `pcl_jax.kernels.torch_conv`) and xla (XLA's own). The
PyTorch side is what a PyTorch user would run on this machine: eager mode, all cores, and the
faster of NCHW and channels-last (both are timed). Every measurement runs in a fresh process with
`pcl_jax.kernels.host_memory`'s allocator settings (PCL_JAX_TUNE_MALLOC=0:
all without). Prints images/s of each and the ratio of the JAX step that `auto` runs to the
faster PyTorch one (>= 1.0 means JAX is at least as fast). Then (--interleaved ROUNDS, default
10) the JAX step and PyTorch's channels-last step alternate, 3 steps a round, and the median
paired ratio is printed: the shared machine's speed drifts 10-20% between the separate processes
above, which moves their ratio more than the code does. The PyTorch side of that pair runs in a
second, concurrently alive process (`torch_reference.TorchStepProcess`) that takes turns with the
JAX one, so each process has a single OpenMP team, as a real run has
(`pcl_jax.kernels.host_threads`).
"""

import argparse
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# First, as pcl_jax.main does: malloc tuned before jax starts its threads (host_memory).
from pcl_jax.kernels import host_memory  # pylint: disable=g-import-not-at-top
host_memory.tune_malloc()
import jax  # pylint: disable=g-import-not-at-top
import numpy as np
import torch

from benchmarks import torch_reference

from configs import default  # pylint: disable=g-import-not-at-top
from pcl_jax.clustering import bank as bank_lib
from pcl_jax import kernels
from pcl_jax.kernels import host_threads
from pcl_jax import models
from pcl_jax.run import parallel
from pcl_jax import state as state_lib
from pcl_jax import step as step_lib


def _jax_step_runner(arch, image_size, batch, width, small_stem, num_negatives, warmup, dtype,
                     bn_groups, conv_impl):
  """run(steps) -> images/s of the jitted step, the state carried between calls; warmed up."""
  config = default.get_config()
  config.model.arch, config.model.width, config.model.small_stem = arch, width, small_stem
  config.runtime.conv_impl = conv_impl
  config.train.dtype = dtype
  config.pcl.num_negatives = num_negatives
  model = models.encoder_from_config(config, bn_groups=bn_groups)
  schedule = state_lib.make_lr_schedule(config.optim, 10, 100)
  tx = state_lib.make_optimizer(config.optim, schedule)
  state = state_lib.create_state(jax.random.PRNGKey(0), model, tx, image_size, num_negatives)
  state = jax.device_put(state, parallel.replicated(parallel.data_mesh()))  # as Trainer places it
  step = step_lib.make_train_step(config, model)
  bank = bank_lib.empty_prototype_bank(1, 8, config.model.dim, 1024)
  hparams = step_lib.step_hparams(0.0, 10, 100)
  rng = np.random.default_rng(0)
  batch_np = {'im_q': rng.normal(size=(batch, image_size, image_size, 3)).astype(np.float32),
              'im_k': rng.normal(size=(batch, image_size, image_size, 3)).astype(np.float32),
              'index': np.arange(batch)}

  # Batches arrive from the host each step, as in training.
  def run(steps):
    start = time.perf_counter()
    for _ in range(steps):
      run.state, metrics = step(run.state, batch_np, bank, hparams)
    jax.block_until_ready(metrics)
    return batch * steps / (time.perf_counter() - start)
  run.state = state
  run(warmup)  # compile; the first steps also grow the heap to its steady state (host_memory)
  return run


def _jax_step_images_per_s(steps, **kwargs):
  return _jax_step_runner(**kwargs)(steps)


def _interleaved(args, case: str, rounds: int) -> str:
  """JAX (`auto`, this process) and PyTorch channels-last (a second process, `TorchStepProcess`)
  taking turns, rounds of 3 steps: '<jax median> <torch median> <median paired ratio>'.
  Neighbouring rounds see the same machine state, so the ratio does not drift with the machine
  as separately timed processes do."""
  arch, size, batch, width, small_stem = CASES[case]
  common = dict(arch=arch, image_size=size, batch=batch, width=width, small_stem=small_stem,
                num_negatives=batch * 10, warmup=args.warmup)
  jax_runner = _jax_step_runner(dtype=args.dtype, bn_groups=args.bn_groups, conv_impl='auto',
                                **common)
  with torch_reference.TorchStepProcess(channels_last=True, bf16=args.dtype == 'bfloat16',
                                        **common) as torch_runner:
    (jax_rate, torch_rate), ratio = torch_reference.interleaved_rates([jax_runner, torch_runner],
                                                                      rounds, 3)
  return f'{jax_rate} {torch_rate} {ratio}'


CASES = {'resnet18': ('resnet18', 32, 64, 64, True), 'conv4': ('conv4', 84, 64, 64, False),
         'quick': ('conv4', 32, 16, 16, False)}
# Each measurement: ('jax', conv_impl) or ('torch', channels_last).
MEASUREMENTS = [('jax', 'auto'), ('jax', 'torch'), ('jax', 'xla'), ('torch', False),
                ('torch', True)]


def _measure(args, case: str, side: str, variant):
  """Images/s of one measurement, in this process (side 'interleaved': see `_interleaved`)."""
  arch, size, batch, width, small_stem = CASES[case]
  steps, warmup = (3, 2) if case == 'quick' else (args.steps, args.warmup)
  common = dict(arch=arch, image_size=size, batch=batch, width=width, small_stem=small_stem,
                num_negatives=batch * 10, steps=steps, warmup=warmup)
  # Before JAX starts its CPU client, as pcl_jax.main does (host_threads).
  if side != 'torch':
    host_threads.limit_xla_threads('auto' if side == 'interleaved' else variant, arch)
  if side == 'interleaved':
    return _interleaved(args, case, int(variant))
  if side == 'jax':
    return _jax_step_images_per_s(dtype=args.dtype, bn_groups=args.bn_groups, conv_impl=variant,
                                  **common)
  return torch_reference.torch_step_images_per_s(channels_last=variant,
                                                 bf16=args.dtype == 'bfloat16', **common)


def _measure_in_subprocess(args, case: str, side: str, variant) -> str:
  """Each measurement in a fresh process, so none inherits another's heap (host_memory: the
  Conv4 step ran at 120-145 img/s depending on what the process had run before)."""
  command = [sys.executable, __file__, '--one', case, side, str(variant), '--steps',
             str(args.steps), '--warmup', str(args.warmup), '--dtype', args.dtype,
             '--bn-groups', str(args.bn_groups)]
  result = subprocess.run(command, capture_output=True, text=True, check=False)
  if result.returncode:
    raise RuntimeError(f'{" ".join(command)} failed:\n{result.stderr[-3000:]}')
  return result.stdout.strip().splitlines()[-1]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--quick', action='store_true', help='tiny smoke version')
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--warmup', type=int, default=15,
                      help='untimed steps: compile, and let the heap stop growing')
  parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  parser.add_argument('--bn-groups', type=int, default=4, help='JAX shuffle-BN groups')
  parser.add_argument('--jax-only', action='store_true', help='skip the PyTorch reference')
  parser.add_argument('--case', choices=['resnet18', 'conv4'], help='run one case only')
  parser.add_argument('--interleaved', type=int, default=10, metavar='ROUNDS',
                      help='then JAX vs PyTorch channels-last (in a second process) taking turns '
                      'for ROUNDS rounds (0: skip); the median paired ratio is the steadier figure')
  parser.add_argument('--one', nargs=3, metavar=('CASE', 'SIDE', 'VARIANT'),
                      help='internal: one measurement in this process, prints its images/s')
  args = parser.parse_args()
  if args.one:
    case, side, variant = args.one
    variant = {'True': True, 'False': False}.get(variant, variant)
    print(_measure(args, case, side, variant))
    return
  cases = ['quick'] if args.quick else [args.case] if args.case else ['resnet18', 'conv4']
  measurements = MEASUREMENTS[:3] if args.jax_only else MEASUREMENTS
  print(f'jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} '
        f'({torch.get_num_threads()} threads), {os.cpu_count()} CPUs, dtype {args.dtype}, '
        f'one fresh process per measurement')
  auto = kernels.resolve('auto')
  print(f"{'case':<22}{f'jax auto={auto}':>18}{'jax torch-conv':>15}{'jax xla-conv':>13}"
        f"{'torch NCHW':>12}{'torch CL':>10}{'ratio':>7}")
  for case in cases:
    arch, size, batch, _, _ = CASES[case]
    rates = [float(_measure_in_subprocess(args, case, side, variant))
             for side, variant in measurements]
    row = f'{f"{arch} {size}px b{batch}":<22}{rates[0]:>18.1f}{rates[1]:>15.1f}{rates[2]:>13.1f}'
    if not args.jax_only:
      row += f'{rates[3]:>12.1f}{rates[4]:>10.1f}{rates[0] / max(rates[3], rates[4]):>7.2f}'
    print(row, flush=True)
  if args.interleaved and not args.jax_only:
    print(f'interleaved (PyTorch in a second process, taking turns), {args.interleaved} rounds '
          'of 3 steps each, medians:')
    for case in cases:
      arch, size, batch, _, _ = CASES[case]
      jax_rate, torch_rate, ratio = map(float, _measure_in_subprocess(
          args, case, 'interleaved', args.interleaved).split())
      print(f'{f"{arch} {size}px b{batch}":<22} jax {jax_rate:.1f}  torch CL {torch_rate:.1f}  '
            f'paired ratio {ratio:.2f}', flush=True)


if __name__ == '__main__':
  main()
