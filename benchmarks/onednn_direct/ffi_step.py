"""The jitted ResNet-18 step with `runtime.conv_impl=onednn` (oneDNN custom calls writing XLA's
buffers, `pcl_jax/kernels/onednn/`) against `runtime.conv_impl=torch` (PyTorch's oneDNN through
buffer_callbacks, results copied into XLA's buffers): both steps in one process, taking turns
and swapping order every round, so both see the same machine state. One XLA thread, as
pcl_jax.main sets for a ResNet with host convolutions (host_threads); XLA's default for Conv4.

With `--layer bn`, `pool` or `residual`, both steps are conv_impl=onednn and differ in that
layer only: the BN (+ ReLU) layers in XLA's ops (`fused_batch_norm.grouped_batch_norm`, the
model's own XLA path) against `onednn.batch_norm`, the stem pool as `max_pool.max_pool` against
`onednn.max_pool`, the blocks' joins as `relu(y + shortcut)` against `onednn.residual`, or
(`layout`) every convolution on NHWC activations against `onednn.conv.blocked_layout`'s choice.

  python benchmarks/onednn_direct/ffi_step.py [--case resnet18|resnet18_84|conv4] [--rounds N]
      [--layer conv|bn|pool|residual|layout]
"""

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from benchmarks import step_throughput  # pylint: disable=g-import-not-at-top  (pcl_jax first)
from pcl_jax.kernels import fused_batch_norm  # pylint: disable=g-import-not-at-top
from pcl_jax.kernels import host_threads  # pylint: disable=g-import-not-at-top
from pcl_jax.kernels.onednn import batch_norm as onednn_batch_norm  # pylint: disable=g-import-not-at-top
from pcl_jax.kernels.onednn import conv as onednn_conv  # pylint: disable=g-import-not-at-top
from pcl_jax.kernels.onednn import max_pool as onednn_max_pool  # pylint: disable=g-import-not-at-top
from pcl_jax.kernels.onednn import residual as onednn_residual  # pylint: disable=g-import-not-at-top

# step_throughput's cases, plus the mini-ImageNet step: (arch, size, batch, width, small stem).
CASES = {'resnet18': step_throughput.CASES['resnet18'], 'conv4': step_throughput.CASES['conv4'],
         'resnet18_84': ('resnet18', 84, 96, 64, False)}


# --layer: (module, attribute, what replaces it while the baseline step is traced,
# (baseline's name, variant's name)).
_BASELINES = {
    'bn': (onednn_batch_norm, 'batch_norm', fused_batch_norm.grouped_batch_norm,
           ('bn in XLA', 'bn on oneDNN')),
    'pool': (onednn_max_pool, 'supported', lambda *unused: False,
             ('pool in XLA', 'pool on oneDNN')),
    'residual': (onednn_residual, 'supported', lambda *unused: False,
                 ('residual in XLA', 'residual on oneDNN')),
    'layout': (onednn_conv, 'blocked_layout', lambda *unused: (False, False),
               ('all NHWC', 'blocked by rule'))}


def _runners(layer: str, common) -> dict:
  """{name: run(steps) -> img/s}: baseline first, then the oneDNN variant."""
  if layer == 'conv':
    return {f'conv_impl={impl}': step_throughput._jax_step_runner(conv_impl=impl, **common)  # pylint: disable=protected-access
            for impl in ('torch', 'onednn')}
  module, attribute, baseline, names = _BASELINES[layer]
  original = getattr(module, attribute)
  setattr(module, attribute, baseline)  # read when the step is traced, in the warm-up
  try:
    runners = {names[0]: step_throughput._jax_step_runner(conv_impl='onednn', **common)}  # pylint: disable=protected-access
  finally:
    setattr(module, attribute, original)
  runners[names[1]] = step_throughput._jax_step_runner(conv_impl='onednn', **common)  # pylint: disable=protected-access
  return runners


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--case', default='resnet18', choices=sorted(CASES))
  parser.add_argument('--rounds', type=int, default=8)
  parser.add_argument('--steps', type=int, default=3, help='steps per side per round')
  parser.add_argument('--layer', default='conv', choices=['conv', *_BASELINES],
                      help='what the two steps differ in (see the module doc)')
  args = parser.parse_args()
  arch, size, batch, width, small_stem = CASES[args.case]
  # Before JAX starts its CPU client, as pcl_jax.main does: one XLA thread for a ResNet on host
  # kernels, XLA's default for Conv4 (the same for both sides).
  host_threads.limit_xla_threads('onednn', arch)
  common = dict(arch=arch, image_size=size, batch=batch, width=width, small_stem=small_stem,
                num_negatives=batch * 10, warmup=4, dtype='float32', bn_groups=4)
  runners = _runners(args.layer, common)
  rates = {name: [] for name in runners}
  for round_ in range(args.rounds):
    for name in (list(runners) if round_ % 2 == 0 else list(runners)[::-1]):
      rates[name].append(runners[name](args.steps))
  print(f'{args.case}: JAX step img/s, PJRT_NPROC={os.environ.get("PJRT_NPROC", "default")}, '
        f'{args.rounds} alternating rounds of {args.steps} steps')
  for name, values in rates.items():
    print(f'  {name:18} median {statistics.median(values):6.1f}  ('
          + ' '.join(f'{v:.1f}' for v in values) + ')')
  baseline, variant = rates.values()
  paired = [b / a for a, b in zip(baseline, variant)]
  print(f'  {" / ".join(list(runners)[::-1])}, median paired ratio '
        f'{statistics.median(paired):.3f}')


if __name__ == '__main__':
  main()
