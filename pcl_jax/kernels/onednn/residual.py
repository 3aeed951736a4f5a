"""A residual block's join, relu(y + shortcut), as an XLA FFI custom call on oneDNN, CPU only.

Why this exists: once a ResNet's convolutions, batch norms and stem pool ran on oneDNN
(`onednn.conv`, `onednn.batch_norm`, `onednn.max_pool`), the largest of XLA's own ops left in
the step were the blocks' joins, each a pass over the activations on the one XLA thread
(`host_threads`): ~21 ms of the ~680 ms ResNet-18 step at 32 px on the 2-core test machine,
~11 ms of it the add + max forwards (a step profile). The forward here is oneDNN's binary
add with a ReLU post-op, on every core, written over `y`'s buffer.

The gradient stays in XLA on purpose: a join's output has two readers (the next block's
convolution and its shortcut), and XLA fuses the sum of their gradients with the ReLU's mask
into one pass. oneDNN's ReLU backward after XLA's sum measured slower in the step (x1.008-1.009
against x1.016-1.020 with this forward alone, ResNet-18 32 px, in-process A/B), and so did a
masked-sum loop of ours.

Semantics are `jax.nn.relu(y + shortcut)`'s, gradient included: both summands receive
out_grad * (out > 0) (at out == 0 the gradient is 0, as jax.nn.relu's). float32 only; `join` uses XLA's
ops otherwise.
"""

import jax
import jax.numpy as jnp

from pcl_jax.kernels.onednn import library


def supported(y, shortcut) -> bool:
  return y.dtype == shortcut.dtype == jnp.float32 and y.shape == shortcut.shape


@jax.custom_vjp
def add_relu(y: jax.Array, shortcut: jax.Array) -> jax.Array:
  """relu(y + shortcut) for float32 arrays of one shape (callers check `supported`)."""
  # aliases: the sum goes into y's buffer (the block's last BN output, read by nothing else;
  # XLA copies y first where something is).
  return library.call('residual_forward', jax.ShapeDtypeStruct(y.shape, jnp.float32), y,
                          shortcut, aliases={0: 0})


def _forward(y, shortcut):
  out = add_relu(y, shortcut)
  return out, out


def _backward(out, out_grad):
  grad = jnp.where(out > 0, out_grad, jnp.zeros_like(out_grad))
  return grad, grad


add_relu.defvjp(_forward, _backward)


def join(y: jax.Array, shortcut: jax.Array) -> jax.Array:
  """The kernel set's residual join: `add_relu` where `supported`, else XLA's ops."""
  if supported(y, shortcut):
    return add_relu(y, shortcut)
  return jax.nn.relu(y + shortcut)
