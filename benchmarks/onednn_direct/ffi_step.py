"""The jitted ResNet-18 step with its convolutions as XLA FFI custom calls on oneDNN 3.2
(`conv_ffi.cc`, outputs written in place) against the shipped `cpu_conv` path (PyTorch's oneDNN
through buffer_callbacks, results copied into XLA's buffers): both steps in one process, taking
turns, so both see the same machine state. Also checks the custom calls against XLA's
convolutions first. A prototype for a future `model.conv_impl`; run through `run.sh step`.

  bash benchmarks/onednn_direct/run.sh step [--case resnet18|resnet18_84] [--rounds N]
"""

import argparse
import ctypes
import functools
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from benchmarks import step_throughput  # pylint: disable=g-import-not-at-top  (pcl_jax first)
import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np

from pcl_jax import cpu_conv

_TARGETS = {'forward': 'PclConvForward', 'backward': 'PclConvBackward',
            'backward_kernel': 'PclConvBackwardKernel'}


def register(library: str):
  lib = ctypes.cdll.LoadLibrary(library)
  for name, symbol in _TARGETS.items():
    jax.ffi.register_ffi_target(f'pcl_onednn_{name}', jax.ffi.pycapsule(getattr(lib, symbol)),
                                platform='cpu')


def _call(name, results, *operands, stride, padding):
  return jax.ffi.ffi_call(f'pcl_onednn_{name}', results)(
      *operands, stride_h=np.int64(stride[0]), stride_w=np.int64(stride[1]),
      pad_h=np.int64(padding[0]), pad_w=np.int64(padding[1]))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def onednn_conv(images, kernel, stride, padding, layout):
  if layout != 'OHWI' or images.dtype != jnp.float32:
    raise NotImplementedError('the prototype takes float32 images and OHWI kernels only')
  shape = cpu_conv._output_shape(images.shape, kernel.shape, stride, padding, layout)  # pylint: disable=protected-access
  return _call('forward', jax.ShapeDtypeStruct(shape, images.dtype), images, kernel,
               stride=stride, padding=padding)


def _forward(images, kernel, stride, padding, layout):
  out = onednn_conv(images.value, kernel.value, stride, padding, layout)
  return out, (images.value, kernel.value, images.perturbed)


def _backward(stride, padding, layout, residuals, out_grad):
  del layout
  images, kernel, images_need_grad = residuals
  like = lambda array: jax.ShapeDtypeStruct(array.shape, array.dtype)
  if images_need_grad:
    return tuple(_call('backward', (like(images), like(kernel)), out_grad, images, kernel,
                       stride=stride, padding=padding))
  return None, _call('backward_kernel', like(kernel), out_grad, images, kernel, stride=stride,
                     padding=padding)


onednn_conv.defvjp(_forward, _backward, symbolic_zeros=True)


def check_against_xla():
  """Largest |difference| of forward and both gradients against lax's convolution."""
  worst = 0.0
  rng = np.random.default_rng(0)
  for cin, cout, k, s, p, size in [(3, 8, 3, 1, 1, 9), (8, 16, 3, 2, 1, 10), (8, 16, 1, 2, 0, 10),
                                   (3, 8, 7, 2, 3, 16)]:
    x = jnp.asarray(rng.normal(size=(2, size, size, cin)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(cout, k, k, cin)), jnp.float32)
    def loss(conv, x, w):
      y = conv(x, w)
      return jnp.sum(y * jnp.sin(y))
    ours = lambda x, w: onednn_conv(x, w, (s, s), (p, p), 'OHWI')
    xla = lambda x, w: jax.lax.conv_general_dilated(x, w, (s, s), [(p, p)] * 2,
                                                    dimension_numbers=('NHWC', 'OHWI', 'NHWC'),
                                                    precision='highest')
    for a, b in zip(jax.jit(jax.value_and_grad(functools.partial(loss, ours), (0, 1)))(x, w),
                    jax.jit(jax.value_and_grad(functools.partial(loss, xla), (0, 1)))(x, w)):
      for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        worst = max(worst, float(jnp.max(jnp.abs(u - v)) / (1 + jnp.max(jnp.abs(v)))))
  return worst


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--library', required=True)
  parser.add_argument('--case', default='resnet18', choices=['resnet18', 'resnet18_84'])
  parser.add_argument('--rounds', type=int, default=8)
  parser.add_argument('--steps', type=int, default=3, help='steps per side per round')
  args = parser.parse_args()
  register(args.library)
  print(f'custom calls against XLA convolutions, largest relative difference: '
        f'{check_against_xla():.2e}')
  if args.case == 'resnet18':
    common = dict(arch='resnet18', image_size=32, batch=64, width=64, small_stem=True,
                  num_negatives=640)
  else:
    common = dict(arch='resnet18', image_size=84, batch=96, width=64, small_stem=False,
                  num_negatives=960)
  common.update(warmup=4, dtype='float32', bn_groups=4, conv_impl='torch')
  shipped = step_throughput._jax_step_runner(**common)  # pylint: disable=protected-access
  cpu_conv._torch_conv = onednn_conv  # pylint: disable=protected-access  (traced from here on)
  prototype = step_throughput._jax_step_runner(**common)  # pylint: disable=protected-access
  rates = {'cpu_conv (torch calls)': [], 'FFI on oneDNN 3.2': []}
  for round_ in range(args.rounds):
    order = [('cpu_conv (torch calls)', shipped), ('FFI on oneDNN 3.2', prototype)]
    for name, run in (order if round_ % 2 == 0 else order[::-1]):
      rates[name].append(run(args.steps))
  print(f'{args.case}: JAX step img/s, {args.rounds} alternating rounds of {args.steps} steps')
  for name, values in rates.items():
    print(f'  {name:24} median {statistics.median(values):6.1f}  ('
          + ' '.join(f'{v:.1f}' for v in values) + ')')
  paired = [b / a for a, b in zip(*rates.values())]
  print(f'  FFI / cpu_conv, median paired ratio {statistics.median(paired):.3f}')


if __name__ == '__main__':
  main()
