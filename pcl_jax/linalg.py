"""Row-wise vector helpers shared by the encoder, the clustering and the evaluation (pure JAX)."""

import jax.numpy as jnp


def l2_normalize(x, axis: int = -1, eps: float = 1e-12):
  """x / max(||x||, eps) along `axis`, as torch.nn.functional.normalize: zero rows stay zero
  (as faiss's fvec_renorm_L2 leaves them)."""
  norm = jnp.sqrt(jnp.sum(x * x, axis=axis, keepdims=True))
  return x / jnp.maximum(norm, eps)
