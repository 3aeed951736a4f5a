"""MoCo v1's colour augmentation on the device, equal to Pillow's pixel for pixel.

Why this exists: on a GPU the training epoch is bound by the loader's PIL work, and most of that
work is colour (per 84 px view, measured on the 2-core machine: ColorJitter 0.52 ms, hue alone
0.36, of ~0.7 ms; RandomResizedCrop 0.10). With `data.augment_on_device` the loader workers keep
the crop and the flip, draw the colour parameters exactly as torchvision would (same RNG calls,
same order: `input_pipeline.CropFlipAndColorParams`) and ship them with the uint8 view; this
module applies RandomGrayscale(p=0.2) then ColorJitter(0.4, 0.4, 0.4, 0.4) inside the jitted
step. The flip commutes with both (every op is per pixel except contrast's image mean).

Equal to torchvision's PIL path, not approximately (each step is checked against Pillow over
all 2^24 colours, `tests/test_color_augment.py`):
- grayscale and the saturation/contrast degenerates: Pillow's L = (19595 R + 38470 G + 7471 B
  + 2^15) >> 16, in integers;
- brightness, contrast, saturation: `Image.blend(degenerate, image, factor)`, i.e. float32
  `d + factor * (x - d)`, clipped and truncated to uint8; contrast's degenerate is the image's
  mean L rounded as `int(mean + 0.5)`;
- hue: Pillow's RGB -> HSV (uint8 channels) round trip with the hue channel shifted by
  `int32(hue_factor * 255)` mod 256 (torchvision's `adjust_hue`). Pillow mixes float and double
  arithmetic there; float32 reproduces it with an exact three-term sum (TwoSum) for the hue
  angle, threshold tables for the double-precision steps of the hue byte, and host-computed
  tables for the HSV -> RGB coefficients.
The results are identical where XLA computes float32 by IEEE rules without contracting a
multiply and an add into one fused op (checked on the CPU; `tests` also run the check on a GPU
when one is present).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pcl_jax import input_pipeline

# Pillow's ITU-R 601-2 luma (Convert.c, L24), in 16-bit fixed point.
_LUMA_WEIGHTS = (19595, 38470, 7471)
_LUMA_ROUNDING = 1 << 15
_BRIGHTNESS, _CONTRAST, _SATURATION, _HUE = range(4)  # torchvision's ColorJitter fn_idx values


def luminance(pixels: jnp.ndarray) -> jnp.ndarray:
  """Pillow's RGB -> L of int32 pixels [..., 3]: int32 [...]."""
  red, green, blue = (pixels[..., c] * w for c, w in enumerate(_LUMA_WEIGHTS))
  return (red + green + blue + _LUMA_ROUNDING) >> 16


def _split(x: jnp.ndarray):
  """(high, low) with x = high + low exactly, high keeping x's top 15 significant bits: a
  product of either with a byte is then exact in float32."""
  bits = jax.lax.bitcast_convert_type(x, jnp.int32)
  high = jax.lax.bitcast_convert_type(bits & ~0x1FF, jnp.float32)
  return high, x - high


def blend(degenerate: jnp.ndarray, pixels: jnp.ndarray, factor: jnp.ndarray) -> jnp.ndarray:
  """Pillow's `Image.blend(degenerate, image, factor)` on int32 pixels, float32 factor
  broadcastable to them: float32 d + factor * (x - d), truncated towards zero and clipped to
  [0, 255], as Blend.c.

  Pillow rounds the product before adding. XLA may fuse a multiply and an add into one
  rounding (an FMA), so the product is formed from two exact partial products instead."""
  start = degenerate.astype(jnp.float32)
  difference = pixels.astype(jnp.float32) - start
  high, low = _split(factor)
  value = start + (high * difference + low * difference)
  return jnp.floor(jnp.clip(value, 0.0, 255.0)).astype(jnp.int32)


def image_mean_luminance(pixels: jnp.ndarray) -> jnp.ndarray:
  """int(mean L + 0.5) per image of int32 pixels [B, H, W, 3]: [B] int32 (ImageEnhance.Contrast).
  In integers, floor((2 sum + n) / 2n); exact for images of up to 4 million pixels."""
  count = pixels.shape[1] * pixels.shape[2]
  total = luminance(pixels).sum(axis=(1, 2))
  return (2 * total + count) // (2 * count)


# --- hue: Pillow's HSV round trip -------------------------------------------------------------

def _pillow_hue_byte(hue: np.ndarray) -> np.ndarray:
  """Pillow's hue byte from its float hue h in [-1, 5] (Convert.c rgb2hsv_row), in numpy with
  Pillow's float / double steps: h = fmod(h / 6.0 + 1.0, 1.0) stored as float, then
  (int)(h * 255.0)."""
  wrapped = np.fmod(hue.astype(np.float64) / 6.0 + 1.0, 1.0).astype(np.float32)
  return np.clip(np.trunc(wrapped.astype(np.float64) * 255.0), 0, 255).astype(np.int32)


def _float_order(values: np.ndarray) -> np.ndarray:
  """float32 -> int64 keys in the floats' order (for bisection over representable floats)."""
  bits = values.astype(np.float32).view(np.int32).astype(np.int64)
  return np.where(bits < 0, -(bits & 0x7FFFFFFF), bits)


def _float_from_order(keys: np.ndarray) -> np.ndarray:
  bits = np.where(keys < 0, (-keys) | 0x80000000, keys).astype(np.uint32)
  return bits.view(np.float32)


def _first_floats_reaching(low: float, high: float, targets: np.ndarray) -> np.ndarray:
  """For each target byte, the least float32 h in [low, high] with _pillow_hue_byte(h) >= it
  (the byte is non-decreasing on the range)."""
  lo = np.full(targets.shape, _float_order(np.float32(low)), np.int64)
  hi = np.full(targets.shape, _float_order(np.float32(high)), np.int64)
  while np.any(lo < hi):
    mid = (lo + hi) // 2
    reached = _pillow_hue_byte(_float_from_order(mid)) >= targets
    hi, lo = np.where(reached, mid, hi), np.where(reached, lo, mid + 1)
  return _float_from_order(lo)


@functools.lru_cache(maxsize=None)
def _hue_byte_thresholds():
  """(byte at h = -1, thresholds on [-1, 0), thresholds on [0, 5]): the hue byte is the first
  value plus the count of negative thresholds <= h for h < 0, else the count of non-negative
  thresholds <= h. Pillow's byte is non-decreasing on each part (it wraps at h = 0)."""
  base = int(_pillow_hue_byte(np.float32([-1.0]))[0])
  top_negative = int(_pillow_hue_byte(np.float32([-2.0 ** -10]))[0])
  top_positive = int(_pillow_hue_byte(np.float32([5.0]))[0])
  negative = _first_floats_reaching(-1.0, -2.0 ** -10, np.arange(base + 1, top_negative + 1))
  positive = _first_floats_reaching(0.0, 5.0, np.arange(1, top_positive + 1))
  return base, negative, positive


@functools.lru_cache(maxsize=None)
def _hsv_to_rgb_tables():
  """Pillow's hsv2rgb coefficients x of its rounds of v * (1 - x), as float32 [256 s, 256 h]
  tables computed with Pillow's arithmetic: fs = s / 255 and f = h * 6 / 255 - i rounded to
  float; for q, fs * f (a float product); for t, fs * (1.0 - f) in double, rounded to float
  (checked over every (h, s, v): the rounding never moves Pillow's result); for p, fs."""
  byte = np.arange(256, dtype=np.float32).astype(np.float64)
  sector = np.floor(byte * 6.0 / 255.0)
  fraction = (byte * 6.0 / 255.0 - sector).astype(np.float32)
  scale = (byte / 255.0).astype(np.float32)
  for_q = scale[:, None] * fraction[None, :]
  for_t = (scale[:, None].astype(np.float64) * (1.0 - fraction[None, :].astype(np.float64)))
  return scale, for_q, for_t.astype(np.float32)


def _round_level_times_complement(level: jnp.ndarray, x: jnp.ndarray) -> jnp.ndarray:
  """C's round(v * (1.0 - x)) in double, exactly: int32 level v in [0, 255], float32 x in
  [0, 1]. Equal to v - ceil(v x - 1/2), with v x = A + B in two exact products (`_split`), so
  no rounding (nor a fused multiply-add) can move a value across a half."""
  high, low = _split(x)
  v = level.astype(jnp.float32)
  shifted = v * high - 0.5  # exact: v * high has <= 23 significant bits, above 2^-24 once >= 1/4
  whole = jnp.ceil(shifted)
  ceiling = whole + (v * low > whole - shifted).astype(jnp.float32)
  # v x < 1/2 (v * high < 1/4 and the low part far smaller) rounds to v itself.
  return level - jnp.where(v * high < 0.25, 0.0, ceiling).astype(jnp.int32)


def _two_sum(a, b):
  """(a + b rounded, its exact rounding error): Knuth's TwoSum, exact in IEEE float32."""
  total = a + b
  b_part = total - a
  return total, (a - (total - b_part)) + (b - b_part)


def _exact_sum3(a, b, c):
  """float32(a + b - c) with a single rounding, as Pillow's `2.0 + rc - bc` (computed in double,
  exact for these operands, then stored as float)."""
  difference, error = _two_sum(b, -c)
  total, carry = _two_sum(a, difference)
  return total + (carry + error)


def rgb_to_hsv(pixels: jnp.ndarray) -> jnp.ndarray:
  """Pillow's RGB -> HSV of int32 pixels [..., 3] (each channel a byte): int32 [..., 3]."""
  red, green, blue = pixels[..., 0], pixels[..., 1], pixels[..., 2]
  top = jnp.maximum(red, jnp.maximum(green, blue))
  bottom = jnp.minimum(red, jnp.minimum(green, blue))
  gray = top == bottom
  spread = jnp.where(gray, 1, top - bottom).astype(jnp.float32)
  saturation = spread / jnp.maximum(top, 1).astype(jnp.float32)
  red_c, green_c, blue_c = ((top - c).astype(jnp.float32) / spread for c in (red, green, blue))
  green_top = green == top
  hue = jnp.where(red == top, blue_c - green_c,
                  _exact_sum3(jnp.where(green_top, 2.0, 4.0).astype(jnp.float32),
                              jnp.where(green_top, red_c, green_c),
                              jnp.where(green_top, blue_c, red_c)))
  base, negative, positive = _hue_byte_thresholds()
  hue_byte = jnp.where(hue < 0,
                       base + jnp.searchsorted(jnp.asarray(negative), hue, side='right'),
                       jnp.searchsorted(jnp.asarray(positive), hue, side='right'))
  saturation_byte = jnp.clip(jnp.floor(saturation * 255.0), 0, 255)
  return jnp.stack([jnp.where(gray, 0, hue_byte).astype(jnp.int32),
                    jnp.where(gray, 0, saturation_byte).astype(jnp.int32), top], axis=-1)


def hsv_to_rgb(hsv: jnp.ndarray) -> jnp.ndarray:
  """Pillow's HSV -> RGB of int32 [..., 3] byte channels: int32 [..., 3]."""
  hue, saturation, value = hsv[..., 0], hsv[..., 1], hsv[..., 2]
  scale, for_q, for_t = (jnp.asarray(table) for table in _hsv_to_rgb_tables())
  sector = (6 * hue) // 255 % 6  # Pillow's floor(h * 6.0 / 255.0) % 6, exact for integers
  pair = saturation * 256 + hue
  p, q, t = (jnp.clip(_round_level_times_complement(value, x), 0, 255)
             for x in (scale[saturation], for_q.reshape(-1)[pair], for_t.reshape(-1)[pair]))
  # Pillow's switch (i % 6): which of v, p, q, t goes to R, G and B.
  cases = [sector == k for k in range(5)]
  red = jnp.select(cases, [value, q, p, p, t], value)
  green = jnp.select(cases, [t, value, value, q, p], p)
  blue = jnp.select(cases, [p, p, t, value, value], q)
  rgb = jnp.stack([red, green, blue], axis=-1)
  return jnp.where((saturation == 0)[..., None], value[..., None], rgb)


def adjust_hue(pixels: jnp.ndarray, shift: jnp.ndarray) -> jnp.ndarray:
  """torchvision's PIL `adjust_hue`: the hue byte moved by `shift` (int32, broadcastable to the
  pixels' [...] shape; `int32(hue_factor * 255)`) modulo 256."""
  hsv = rgb_to_hsv(pixels)
  moved = (hsv[..., 0] + shift) & 255
  return hsv_to_rgb(jnp.concatenate([moved[..., None], hsv[..., 1:]], axis=-1))


# --- the augmentation ----------------------------------------------------------------------------

def _per_image(values, ndim: int = 4):
  return values.reshape(values.shape[:1] + (1,) * (ndim - 1))


def color_augment(pixels: jnp.ndarray, params: jnp.ndarray) -> jnp.ndarray:
  """RandomGrayscale then ColorJitter, per image, with the loader's drawn parameters.

  Args:
    pixels: uint8 [B, H, W, 3] views (cropped and flipped by the loader).
    params: float32 [B, len(input_pipeline.COLOR_PARAMS)], laid out as that tuple names.
  Returns:
    int32 [B, H, W, 3] pixels in [0, 255], as the PIL path's uint8 output.
  """
  field = {name: params[:, i] for i, name in enumerate(input_pipeline.COLOR_PARAMS)}
  x = pixels.astype(jnp.int32)
  gray = jnp.broadcast_to(luminance(x)[..., None], x.shape)
  x = jnp.where(_per_image(field['grayscale'] > 0), gray, x)
  factors = [field['brightness'], field['contrast'], field['saturation']]
  shift = _per_image(field['hue_shift'].astype(jnp.int32), 3)
  order = params[:, input_pipeline.COLOR_PARAMS.index('op_0'):][:, :4].astype(jnp.int32)

  def apply_one(position, x):
    op = jax.lax.dynamic_index_in_dim(order, position, axis=1, keepdims=False)
    # One blend serves brightness, contrast and saturation: only the degenerate image differs.
    degenerate = jnp.select(
        [_per_image(op == _BRIGHTNESS), _per_image(op == _CONTRAST)],
        [jnp.zeros_like(x), _per_image(image_mean_luminance(x))],
        luminance(x)[..., None])
    factor = jnp.select([op == _BRIGHTNESS, op == _CONTRAST], factors[:2], factors[2])
    blended = blend(degenerate, x, _per_image(factor))
    return jnp.where(_per_image(op == _HUE), adjust_hue(x, shift), blended)

  # A loop, not four unrolled steps: each step's image is then materialised once, where XLA
  # fused the unrolled chain into one loop that recomputed earlier steps per use (5x slower).
  return jax.lax.fori_loop(0, 4, apply_one, x)
