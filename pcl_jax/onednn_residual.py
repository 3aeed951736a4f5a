"""A residual block's join, relu(y + shortcut), as XLA FFI custom calls on oneDNN, CPU only.

Why this exists: once a ResNet's convolutions, batch norms and stem pool ran on oneDNN
(`onednn_conv`, `onednn_batch_norm`, `onednn_max_pool`), the largest of XLA's own ops left in
the step were the blocks' joins: the add + max forward and the select backward, each a full
pass over the activations on the one XLA thread (`host_threads`), ~17 ms of the ~680 ms
ResNet-18 step at 32 px on the 2-core test machine (session 11 profile). oneDNN's binary add
with a ReLU post-op, and its ReLU backward from the output, run on every core.

Semantics are `jax.nn.relu(y + shortcut)`'s, gradient included: both summands receive
out_grad * (out > 0) (at out == 0, relu's gradient 0, as jax.nn.relu's). float32 only; the
model uses XLA's ops otherwise.
"""

import jax
import jax.numpy as jnp

from pcl_jax import onednn_conv


def supported(y, shortcut) -> bool:
  return y.dtype == shortcut.dtype == jnp.float32 and y.shape == shortcut.shape


@jax.custom_vjp
def add_relu(y: jax.Array, shortcut: jax.Array) -> jax.Array:
  """relu(y + shortcut) for float32 arrays of one shape (callers check `supported`)."""
  return onednn_conv.call('residual_forward', jax.ShapeDtypeStruct(y.shape, jnp.float32), y,
                          shortcut, aliases={0: 0})


def _forward(y, shortcut):
  out = add_relu(y, shortcut)
  return out, out


def _backward(out, out_grad):
  grad = onednn_conv.call('residual_backward', jax.ShapeDtypeStruct(out.shape, jnp.float32), out,
                          out_grad.astype(jnp.float32))
  return grad, grad


add_relu.defvjp(_forward, _backward)
