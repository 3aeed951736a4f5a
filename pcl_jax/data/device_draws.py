"""The training augmentation's random draws on the device (jax.random), for `data.device_resident`.

Why this exists: with the training set resident on the devices, the epoch needs no host loader
at all if the views' random choices are drawn where they are applied. `draw_views` makes, per
view, the `recipes.AUGMENT_PARAMS` row that `transforms.AugmentationDraws` makes on the host
(torchvision's calls), from the same distributions, for `device_augment.augment` to apply:
- RandomResizedCrop: up to `recipes.CROP_ATTEMPTS` tries of an area fraction ~ U(CROP_SCALE) and
  a log aspect ratio ~ U(log CROP_RATIO), w = round(sqrt(area * ratio)), h = round(sqrt(area /
  ratio)), the first try that fits, at a uniform offset; else torchvision's central fallback;
- the flip, grayscale and (MoCo v2) the jitter's and the blur's coins, with torchvision's
  comparisons (`p < u` skips a RandomApply, `u < p` fires the others);
- ColorJitter: a uniform order of its four ops, factors ~ U(1 - s, 1 + s), hue ~ U(-h, h) as
  the byte shift int32(hue * 255) mod 256;
- the blur (v2): sigma ~ U(BLUR_SIGMA) as Pillow's box-blur weights (`box_blur_weights`).
The draws are JAX's, not torch's, so a view differs from the host path's for the same seed;
the distributions are the same (tests/test_device_draws.py compares them with the host's).
Pure functions of a key: a run's draws are fixed by (seed, epoch, step), so a resumed run draws
what the uninterrupted one did.
"""

import jax
import jax.numpy as jnp
import numpy as np

from pcl_jax.data import recipes


def box_blur_weights(sigma: jnp.ndarray):
  """`recipes.pillow_box_blur` of float32 sigmas, elementwise: (radius, inner, far) int32.

  The same float32 steps as Pillow; its two double-precision steps (a square root and a floor)
  are float32 here, and XLA may fuse a multiply and an add, so a 24-bit weight can differ from
  Pillow's by a unit or two (tests/test_device_draws.py); the radius is Pillow's."""
  f32 = jnp.float32
  variance = sigma * sigma / f32(recipes.BLUR_PASSES)
  length = jnp.sqrt(f32(12) * variance + f32(1))
  whole = jnp.floor((length - f32(1)) / f32(2))
  fraction = (f32(2) * whole + f32(1)) * (whole * (whole + f32(1)) - f32(3) * variance)
  fraction = fraction / (f32(6) * (variance - (whole + f32(1)) * (whole + f32(1))))
  box_radius = whole + fraction
  inner = jnp.floor(f32(1 << 24) / (box_radius * f32(2) + f32(1))).astype(jnp.int32)
  radius = jnp.floor(box_radius).astype(jnp.int32)
  far = ((1 << 24) - (2 * radius + 1) * inner) // 2
  return radius, inner, far


def crop_boxes(key, num: int, height: int, width: int):
  """RandomResizedCrop.get_params for `num` views of a height x width image: int32 [num, 4]
  (top, left, box height, box width)."""
  area_key, ratio_key, top_key, left_key = jax.random.split(key, 4)
  shape = (num, recipes.CROP_ATTEMPTS)
  target_area = height * width * jax.random.uniform(area_key, shape, minval=recipes.CROP_SCALE[0],
                                                    maxval=recipes.CROP_SCALE[1])
  log_ratio = np.log(np.asarray(recipes.CROP_RATIO, np.float32))
  aspect = jnp.exp(jax.random.uniform(ratio_key, shape, minval=log_ratio[0],
                                      maxval=log_ratio[1]))
  # Python's round() halves to even, as jnp.round.
  box_w = jnp.round(jnp.sqrt(target_area * aspect)).astype(jnp.int32)
  box_h = jnp.round(jnp.sqrt(target_area / aspect)).astype(jnp.int32)
  fits = (box_w > 0) & (box_w <= width) & (box_h > 0) & (box_h <= height)
  first = jnp.argmax(fits, axis=1)
  pick = lambda values: jnp.take_along_axis(values, first[:, None], axis=1)[:, 0]
  found = fits.any(axis=1)
  fallback_h, fallback_w = _central_fallback(height, width)
  box_h = jnp.where(found, pick(box_h), fallback_h)
  box_w = jnp.where(found, pick(box_w), fallback_w)
  # torch.randint(0, n): uniform over 0..n-1.
  top = jnp.floor(jax.random.uniform(top_key, (num,)) * (height - box_h + 1)).astype(jnp.int32)
  left = jnp.floor(jax.random.uniform(left_key, (num,)) * (width - box_w + 1)).astype(jnp.int32)
  top = jnp.where(found, top, (height - box_h) // 2)
  left = jnp.where(found, left, (width - box_w) // 2)
  return jnp.stack([top, left, box_h, box_w], axis=1)


def _central_fallback(height: int, width: int):
  """torchvision's box when no try fits: the whole image, cut to the nearest allowed ratio."""
  in_ratio = width / height
  if in_ratio < min(recipes.CROP_RATIO):
    return int(round(width / min(recipes.CROP_RATIO))), width
  if in_ratio > max(recipes.CROP_RATIO):
    return height, int(round(height * max(recipes.CROP_RATIO)))
  return height, width


def jitter_draws(key, num: int, strengths):
  """ColorJitter.get_params of `num` views: float32 [num, 8] (the four ops' order, the
  brightness, contrast and saturation factors, the hue byte shift)."""
  order_key, factor_key, hue_key = jax.random.split(key, 3)
  order = jnp.argsort(jax.random.uniform(order_key, (num, 4)), axis=1)  # a uniform permutation
  strength = jnp.asarray(strengths[:3], jnp.float32)
  factors = jax.random.uniform(factor_key, (num, 3), minval=1 - strength, maxval=1 + strength)
  hue = jax.random.uniform(hue_key, (num,), minval=-strengths[3], maxval=strengths[3])
  # recipes.hue_shift: int32(hue * 255) (towards zero), then as a byte.
  shift = jnp.mod(jnp.trunc(hue * 255).astype(jnp.int32), 256)
  return jnp.concatenate([order.astype(jnp.float32), factors,
                          shift[:, None].astype(jnp.float32)], axis=1)


def draw_views(key, num: int, height: int, width: int, aug_plus: bool) -> jnp.ndarray:
  """`num` views' augmentation draws: float32 [num, len(recipes.AUGMENT_PARAMS)], MoCo v1 or
  (aug_plus) v2, as `transforms.AugmentationDraws` lays them out; an op that did not fire has
  zero draws, as there."""
  crop_key, coin_key, jitter_key, blur_key = jax.random.split(key, 4)
  boxes = crop_boxes(crop_key, num, height, width).astype(jnp.float32)
  coins = jax.random.uniform(coin_key, (num, 4))  # flip, jitter, grayscale, blur
  flip = coins[:, 0] < recipes.FLIP_P
  grayscale = coins[:, 2] < recipes.GRAYSCALE_P
  if aug_plus:
    jittered = coins[:, 1] <= recipes.JITTER_P_V2
    blurred = coins[:, 3] <= recipes.BLUR_P_V2
    jitter = jitter_draws(jitter_key, num, recipes.JITTER_V2) * jittered[:, None]
    sigma = jax.random.uniform(blur_key, (num,), minval=recipes.BLUR_SIGMA[0],
                               maxval=recipes.BLUR_SIGMA[1])
    blur = jnp.stack(box_blur_weights(sigma), axis=1).astype(jnp.float32) * blurred[:, None]
  else:
    jittered, blurred = jnp.ones((num,), bool), jnp.zeros((num,), bool)
    jitter = jitter_draws(jitter_key, num, recipes.JITTER_V1)
    blur = jnp.zeros((num, 3), jnp.float32)
  fired = jnp.stack([flip, jittered, grayscale, blurred], axis=1).astype(jnp.float32)
  return jnp.concatenate([boxes, fired, jitter, blur], axis=1)
