r"""ResNet's stem max-pool (3x3, stride 2, padding 1): forward and forward + backward, in ms.

  python benchmarks/max_pool.py                      # mini-ImageNet stem: 96 x 42 x 42 x 64
  python benchmarks/max_pool.py --batch 256 --size 42

Compares `pcl_jax.kernels.max_pool.max_pool` (winner index + a select-and-scatter-free backward) with
flax's `nn.max_pool` (XLA's reduce-window, select-and-scatter gradient) and PyTorch's eager
max_pool2d on the same channels-last tensor, all jitted / warmed up, the median of alternating
rounds. The input is a ReLU output (many ties), as in the network; both JAX versions are checked
against PyTorch before timing.
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pcl_jax.kernels import host_memory  # pylint: disable=g-import-not-at-top
host_memory.tune_malloc()  # as pcl_jax.main does, before jax starts its threads
import flax.linen as nn  # pylint: disable=g-import-not-at-top
import jax
import jax.numpy as jnp
import numpy as np
import torch

from pcl_jax.kernels import max_pool


def _flax_pool(x):
  return nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))


def _ours(x):
  return max_pool.max_pool(x, 3, 2, 1)


def _jax_timers(pool, x, out_grad):
  forward = jax.jit(pool)
  both = jax.jit(lambda x, g: jax.vjp(pool, x)[1](g)[0])
  return (lambda: jax.block_until_ready(forward(x)),
          lambda: jax.block_until_ready(both(x, out_grad)))


def _torch_timers(x, out_grad):
  x = torch.from_numpy(np.array(x)).permute(0, 3, 1, 2).requires_grad_()
  out_grad = torch.from_numpy(np.array(out_grad)).permute(0, 3, 1, 2)

  def forward():
    with torch.no_grad():
      return torch.nn.functional.max_pool2d(x, 3, 2, 1)

  def both():
    x.grad = None
    torch.nn.functional.max_pool2d(x, 3, 2, 1).backward(out_grad)
    return x.grad
  return forward, both


def _milliseconds(function, repeats):
  function()
  start = time.perf_counter()
  for _ in range(repeats):
    function()
  return (time.perf_counter() - start) / repeats * 1e3


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batch', type=int, default=96)
  parser.add_argument('--size', type=int, default=42, help='stem output height = width')
  parser.add_argument('--channels', type=int, default=64)
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--repeats', type=int, default=5)
  args = parser.parse_args()
  torch.set_num_threads(os.cpu_count())
  rng = np.random.default_rng(0)
  shape = (args.batch, args.size, args.size, args.channels)
  x = jnp.asarray(np.maximum(rng.normal(size=shape), 0), jnp.float32)
  out_size = (args.size + 2 - 3) // 2 + 1
  out_grad = jnp.asarray(rng.normal(size=(args.batch, out_size, out_size, args.channels)),
                         jnp.float32)
  timers = {'pcl_jax max_pool': _jax_timers(_ours, x, out_grad),
            'flax nn.max_pool': _jax_timers(_flax_pool, x, out_grad),
            'torch max_pool2d': _torch_timers(x, out_grad)}
  want = [np.asarray(t.detach().permute(0, 2, 3, 1)) for t in
          (timers['torch max_pool2d'][0](), timers['torch max_pool2d'][1]())]
  for pool in (_ours, _flax_pool):
    np.testing.assert_array_equal(np.asarray(jax.jit(pool)(x)), want[0])
  np.testing.assert_allclose(np.asarray(jax.jit(lambda x, g: jax.vjp(_ours, x)[1](g)[0])(
      x, out_grad)), want[1], rtol=1e-6, atol=1e-6)
  results = {name: ([], []) for name in timers}
  for _ in range(args.rounds):
    for name, (forward, both) in timers.items():
      results[name][0].append(_milliseconds(forward, args.repeats))
      results[name][1].append(_milliseconds(both, args.repeats))
  print(f'jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} '
        f'({torch.get_num_threads()} threads); input {shape} float32, median of {args.rounds}')
  print(f'{"":20s} {"forward ms":>11s} {"fwd+bwd ms":>11s}')
  medians = {name: (statistics.median(f), statistics.median(b)) for name, (f, b) in
             results.items()}
  for name, (forward, both) in medians.items():
    print(f'{name:20s} {forward:11.1f} {both:11.1f}')
  ours = medians['pcl_jax max_pool'][1]
  print(f'fwd+bwd speed-up of pcl_jax over flax: {medians["flax nn.max_pool"][1] / ours:.2f}x, '
        f'over torch: {medians["torch max_pool2d"][1] / ours:.2f}x')


if __name__ == '__main__':
  main()
