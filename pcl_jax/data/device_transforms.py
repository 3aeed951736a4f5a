"""Image transforms that run on the device: normalisation, and the eval Resize + CenterCrop.

Why this exists: the host's loader then ships uint8 pixels (a quarter of float32's bytes, and
no per-pixel float work in the workers) and the jitted code finishes the transform, batch-sharded
like the network. Two users:
- Training: the loader's augmentations (PIL, the reference's own ops) end in uint8 HWC
  (`transforms.ToUint8HWC`); `step.train_step` normalises the two views with `normalize`.
- The feature pass (every E-step, and evaluation) embeds the whole split under the fixed eval
  transform. The host only slices uint8 rows out of the decoded-image cache
  (`loaders.eval_image_batches`) and `eval_transform` does the rest: through loader
  workers that was PIL work per image on the host, which on an accelerator bounds the E-step.

Both equal the torchvision path bit for bit, not approximately:
- `normalize` is `transforms.ToNormalizedHWC`'s float32 (x - 255 mean) * (1 / (255 std)).
- Resize(R) of a square S-pixel image is Pillow's bilinear resampling, reproduced in integers:
  Pillow's filter taps (`precompute_coeffs`: triangle filter, widened by the scale when
  shrinking, as antialiasing), its 22-bit fixed-point weights, a horizontal pass rounded to uint8,
  then a vertical pass (Pillow's order). int32 sums are exact, so every pixel equals Pillow's.
- CenterCrop(size) uses torchvision's offsets, int(round((R - size) / 2)).
R is the crop itself under `data.eval_resize` 'whole' (a cache of crop-size images passes
unresampled) and 8/7 of it under 'center' (`recipes.eval_resize_size`).
"""

import functools
import math
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np

from pcl_jax.data import recipes
from pcl_jax.run import parallel

# Pillow's fixed point for 8-bit images (Resample.c: PRECISION_BITS = 32 - 8 - 2).
PRECISION_BITS = 22


def normalize(pixels: jnp.ndarray) -> jnp.ndarray:
  """Integer RGB pixels [..., 3] in [0, 255] -> float32, ImageNet-normalised, exactly as
  `transforms.ToNormalizedHWC` computes it (the same float32 constants and operations)."""
  offset = np.float32(recipes.MEAN) * np.float32(255.0)
  scale = np.float32(1.0) / (np.float32(recipes.STD) * np.float32(255.0))
  return (pixels.astype(jnp.float32) - offset) * scale


def network_input(images: jnp.ndarray) -> jnp.ndarray:
  """A batch as the network takes it: uint8 pixels are normalised, float images pass as they are
  (already normalised, e.g. synthetic benchmark batches)."""
  return normalize(images) if images.dtype == jnp.uint8 else images


def _triangle(x: float) -> float:
  """Pillow's bilinear filter, support 1."""
  x = abs(x)
  return 1.0 - x if x < 1.0 else 0.0


def bilinear_taps(in_size: int, out_size: int) -> Tuple[np.ndarray, np.ndarray]:
  """Pillow's bilinear resampling of one axis, in_size -> out_size, as integer taps.

  Returns:
    (first [out_size] int32: the input index of each output's first tap,
     weights [out_size, taps] int32: fixed-point weights, 0 past an output's last tap).
  """
  scale = in_size / out_size
  filter_scale = max(scale, 1.0)  # shrinking widens the filter: Pillow's antialiasing
  support = filter_scale
  inverse = 1.0 / filter_scale  # Pillow multiplies by it (dividing could round differently)
  taps = int(math.ceil(support)) * 2 + 1
  first = np.zeros(out_size, np.int32)
  weights = np.zeros((out_size, taps), np.int64)
  for out in range(out_size):
    center = (out + 0.5) * scale
    low = max(int(center - support + 0.5), 0)  # int(): C's truncation, as Pillow
    high = min(int(center + support + 0.5), in_size)
    real = np.array([_triangle((x - center + 0.5) * inverse) for x in range(low, high)])
    real /= real.sum()
    first[out] = low
    weights[out, :high - low] = (0.5 + real * (1 << PRECISION_BITS)).astype(np.int64)
  return first, weights.astype(np.int32)


def _resample_axis(images: jnp.ndarray, out_size: int, axis: int) -> jnp.ndarray:
  """One Pillow pass along `axis` of int32 pixels in [0, 255], rounded and clipped as Pillow."""
  in_size = images.shape[axis]
  if in_size == out_size:
    return images
  first, weights = bilinear_taps(in_size, out_size)
  total = jnp.full(images.shape[:axis] + (out_size,) + images.shape[axis + 1:],
                   1 << (PRECISION_BITS - 1), jnp.int32)
  shape = [1] * images.ndim
  shape[axis] = out_size
  for tap in range(weights.shape[1]):
    index = np.minimum(first + tap, in_size - 1)  # a zero weight past the last tap
    total = total + jnp.take(images, index, axis=axis) * weights[:, tap].reshape(shape)
  return jnp.clip(total >> PRECISION_BITS, 0, 255)


def center_crop_offset(size: int, crop: int) -> int:
  """torchvision's center_crop offset (Python's round: halves go to even)."""
  return int(round((size - crop) / 2.0))


def eval_transform(images: jnp.ndarray, image_size: int, eval_resize: str) -> jnp.ndarray:
  """uint8 [B, S, S, 3] -> the network's float32 [B, image_size, image_size, 3].

  Equal to `transforms.eval_transform(image_size, eval_resize)` applied to each image
  (`eval_resize`: 'whole' or 'center', `recipes.resolve_eval_resize`).
  """
  batch, height, width, channels = images.shape
  if height != width:
    raise ValueError(f'eval_transform expects square cached images, got {height}x{width}')
  resized = recipes.eval_resize_size(image_size, eval_resize)
  pixels = images.astype(jnp.int32)
  pixels = _resample_axis(pixels, resized, axis=2)  # horizontal first, as Pillow
  pixels = _resample_axis(pixels, resized, axis=1)
  top = center_crop_offset(resized, image_size)
  pixels = jax.lax.slice(pixels, (0, top, top, 0),
                         (batch, top + image_size, top + image_size, channels))
  return normalize(pixels)


@functools.lru_cache(maxsize=None)
def jitted_eval_transform(image_size: int, eval_resize: str, mesh):
  """`eval_transform` jitted once per (size, resize, mesh), batch-sharded in and out."""
  sharding = parallel.batch_sharding(mesh)
  return jax.jit(functools.partial(eval_transform, image_size=image_size,
                                   eval_resize=eval_resize),
                 in_shardings=sharding, out_shardings=sharding)
