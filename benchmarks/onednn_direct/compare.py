"""PyTorch's oneDNN calls (what `pcl_jax.kernels.torch_conv` runs) against oneDNN called directly
(`convolutions.cpp`, what an XLA FFI custom call would run), for ResNet-18's convolutions at
32 px, batch 64, small stem: one forward pass, and one backward pass (d images and d kernel;
d kernel alone for the first layer, as torch_conv). Rounds alternate the two sides, each in its own
process, so both see the same machine state; prints medians and ratios.

Run through run.sh, which fetches oneDNN and builds the C++ side.
"""

import argparse
import os
import statistics
import subprocess
import time

import torch

BATCH = 64


def resnet18_small_stem_convolutions(size: int = 32):
  """(in channels, out channels, kernel, stride, padding, input size) of every convolution."""
  layers = [(3, 64, 3, 1, 1, size)] + [(64, 64, 3, 1, 1, size)] * 4
  channels = 64
  for out in (128, 256, 512):
    layers += [(channels, out, 3, 2, 1, size), (out, out, 3, 1, 1, size // 2),
               (channels, out, 1, 2, 0, size), (out, out, 3, 1, 1, size // 2),
               (out, out, 3, 1, 1, size // 2)]
    channels, size = out, size // 2
  return layers


def _tensors(layer):
  cin, cout, kernel, stride, padding, size = layer
  out_size = (size + 2 * padding - kernel) // stride + 1
  channels_last = torch.channels_last
  images = (torch.rand(BATCH, cin, size, size) - 0.5).to(memory_format=channels_last)
  weight = (torch.rand(cout, cin, kernel, kernel) - 0.5).to(memory_format=channels_last)
  out_grad = (torch.rand(BATCH, cout, out_size, out_size) - 0.5).to(memory_format=channels_last)
  return images, weight, out_grad, stride, padding


def torch_pass_ms(repeats: int, copy: bool):
  """(forward ms, backward ms), medians; `copy`: also copy each result into a preallocated
  buffer, as torch_conv must to hand it to XLA."""
  layers = [_tensors(layer) for layer in resnet18_small_stem_convolutions()]
  outputs = [(torch.empty_like(g), torch.empty_like(x), torch.empty_like(w))
             for x, w, g, _, _ in layers]
  forward, backward = [], []
  with torch.no_grad():
    for _ in range(repeats):
      start = time.perf_counter()
      for (x, w, _, stride, padding), (out, _, _) in zip(layers, outputs):
        result = torch.nn.functional.conv2d(x, w, stride=stride, padding=padding)
        if copy:
          out.copy_(result)
      middle = time.perf_counter()
      for i, ((x, w, g, stride, padding), (_, dx, dw)) in enumerate(zip(layers, outputs)):
        grads = torch.ops.aten.convolution_backward(
            g, x, w, None, [stride] * 2, [padding] * 2, [1, 1], False, [0, 0], 1, [i > 0, True, False])
        if copy:
          if i > 0:
            dx.copy_(grads[0])
          dw.copy_(grads[1])
      end = time.perf_counter()
      forward.append(1e3 * (middle - start))
      backward.append(1e3 * (end - middle))
  return statistics.median(forward), statistics.median(backward)


def onednn_pass_ms(binary: str, repeats: int, threads: int):
  env = dict(os.environ, OMP_NUM_THREADS=str(threads))
  line = subprocess.run([binary, str(repeats)], env=env, check=True, capture_output=True,
                        text=True).stdout.split()
  return float(line[1]), float(line[2])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--binary', required=True, help='the built convolutions.cpp')
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--repeats', type=int, default=15, help='passes per measurement')
  args = parser.parse_args()
  threads = torch.get_num_threads()
  print(f'torch {torch.__version__}, {threads} threads; ResNet-18 32 px batch {BATCH} convolutions, '
        f'ms per pass (medians of {args.repeats}), {args.rounds} alternating rounds')
  rows = {'oneDNN direct (no copies)': [], 'PyTorch calls': [], 'PyTorch calls + copies': []}
  for _ in range(args.rounds):
    rows['oneDNN direct (no copies)'].append(onednn_pass_ms(args.binary, args.repeats, threads))
    rows['PyTorch calls'].append(torch_pass_ms(args.repeats, copy=False))
    rows['PyTorch calls + copies'].append(torch_pass_ms(args.repeats, copy=True))
  medians = {name: tuple(statistics.median(v[i] for v in values) for i in range(2))
             for name, values in rows.items()}
  print(f'{"":28}{"forward":>10}{"backward":>10}{"fwd x2 + bwd":>14}')
  for name, (forward, backward) in medians.items():
    print(f'{name:28}{forward:10.1f}{backward:10.1f}{2 * forward + backward:14.1f}')
  direct = medians['oneDNN direct (no copies)']
  for name in ('PyTorch calls', 'PyTorch calls + copies'):
    ratio = (2 * medians[name][0] + medians[name][1]) / (2 * direct[0] + direct[1])
    print(f'{name} / oneDNN direct, per step (2 forwards + 1 backward): {ratio:.3f}')


if __name__ == '__main__':
  main()
