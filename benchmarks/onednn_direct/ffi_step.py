"""The jitted ResNet-18 step with `model.conv_impl=onednn` (oneDNN custom calls writing XLA's
buffers, `pcl_jax/onednn_conv.py`) against `model.conv_impl=torch` (PyTorch's oneDNN through
buffer_callbacks, results copied into XLA's buffers): both steps in one process, taking turns
and swapping order every round, so both see the same machine state. One XLA thread, as
pcl_jax.main sets for a ResNet with host convolutions (host_threads); XLA's default for Conv4.

  python benchmarks/onednn_direct/ffi_step.py [--case resnet18|resnet18_84|conv4] [--rounds N]
"""

import argparse
import os
import statistics
import sys

# Before JAX starts: the thread count pcl_jax.main would pick (host_threads: one XLA thread for a
# ResNet with host convolutions, XLA's default for Conv4).
if 'conv4' not in sys.argv:
  os.environ.setdefault('PJRT_NPROC', '1')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from benchmarks import step_throughput  # pylint: disable=g-import-not-at-top  (pcl_jax first)

CASES = {'resnet18': dict(arch='resnet18', image_size=32, batch=64, width=64, small_stem=True,
                          num_negatives=640),
         'resnet18_84': dict(arch='resnet18', image_size=84, batch=96, width=64, small_stem=False,
                             num_negatives=960),
         'conv4': dict(arch='conv4', image_size=84, batch=64, width=64, small_stem=False,
                       num_negatives=640)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--case', default='resnet18', choices=sorted(CASES))
  parser.add_argument('--rounds', type=int, default=8)
  parser.add_argument('--steps', type=int, default=3, help='steps per side per round')
  args = parser.parse_args()
  common = dict(CASES[args.case], warmup=4, dtype='float32', bn_groups=4)
  runners = {impl: step_throughput._jax_step_runner(conv_impl=impl, **common)  # pylint: disable=protected-access
             for impl in ('torch', 'onednn')}
  rates = {impl: [] for impl in runners}
  for round_ in range(args.rounds):
    for impl in (list(runners) if round_ % 2 == 0 else list(runners)[::-1]):
      rates[impl].append(runners[impl](args.steps))
  print(f'{args.case}: JAX step img/s, PJRT_NPROC={os.environ.get("PJRT_NPROC", "default")}, {args.rounds} '
        f'alternating rounds of {args.steps} steps')
  for impl, values in rates.items():
    print(f'  conv_impl={impl:7} median {statistics.median(values):6.1f}  ('
          + ' '.join(f'{v:.1f}' for v in values) + ')')
  paired = [b / a for a, b in zip(rates['torch'], rates['onednn'])]
  print(f'  onednn / torch, median paired ratio {statistics.median(paired):.3f}')


if __name__ == '__main__':
  main()
