"""The training augmentation in the jitted step, equal to torchvision's PIL path pixel for pixel.

Why this exists: on a GPU the training epoch is bound by the loader's PIL work (measured on an
H200: 4.3-4.9k pairs/s from 12 workers against a 42-52k img/s step). With
`data.augment_on_device` the loader workers only draw each view's random choices, exactly as
torchvision would (same RNG calls, same order: `transforms.AugmentationDraws`), and ship
them with the cached uint8 image, once per pair; `augment` here applies them per image: MoCo
v1 (RandomResizedCrop, RandomGrayscale(p=0.2), ColorJitter(0.4, 0.4, 0.4, 0.4),
RandomHorizontalFlip) or v2 (RandomResizedCrop, ColorJitter(0.4, 0.4, 0.4, 0.1) with p=0.8,
RandomGrayscale(p=0.2), GaussianBlur with p=0.5, RandomHorizontalFlip). The flip runs right
after the crop: it commutes with the colour ops (per pixel, but for contrast's image mean) and
with the blur (a symmetric kernel with repeated edges).

Equal to the PIL path, not approximately (checked against Pillow over all 2^24 colours and view
for view against torchvision, `tests/test_device_augment.py`):
- the crop: Pillow's bilinear resize of the box, two passes each rounded to uint8, in the order
  Pillow picks for the box's size (`pillow_orders_passes_by_size`), with Pillow's fixed-point
  taps (`device_transforms.bilinear_taps`, one table per box side) in exact int32 arithmetic;
- grayscale and the saturation/contrast degenerates: Pillow's L = (19595 R + 38470 G + 7471 B
  + 2^15) >> 16, in integers;
- brightness, contrast, saturation: `Image.blend(degenerate, image, factor)`, i.e. float32
  `d + factor * (x - d)`, clipped and truncated to uint8; contrast's degenerate is the image's
  mean L rounded as `int(mean + 0.5)`;
- the blur: Pillow's GaussianBlur, three box-blur passes along rows then three along columns,
  with the line weights Pillow computes (`recipes.pillow_box_blur`), in uint32;
- hue: Pillow's RGB -> HSV (uint8 channels) round trip with the hue channel shifted by
  `int32(hue_factor * 255)` mod 256 (torchvision's `adjust_hue`). Pillow mixes float and double
  arithmetic there; float32 reproduces it with an exact three-term sum (TwoSum) for the hue
  angle, threshold tables for the double-precision steps of the hue byte, and host-computed
  tables and exact rounding for the HSV -> RGB coefficients.
XLA fuses multiplies and adds into single-rounding FMAs (on the CPU always, on GPUs by default),
so every product that Pillow rounds before an add is formed here from exact partial products.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from pcl_jax.data import device_transforms
from pcl_jax.data import recipes

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


def _per_image(values, ndim: int = 4):
  """[B] per-image values shaped to broadcast against [B, ...] (ndim axes)."""
  return values.reshape(values.shape[:1] + (1,) * (ndim - 1))


# --- the crop and the flip ---------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _crop_taps(max_side: int, out_size: int):
  """Pillow's bilinear taps for a box side of every length 1..max_side resized to out_size:
  (first [max_side + 1, out_size] int32: offsets in the box; weights [max_side + 1, out_size,
  taps] int32, zero-padded; row 0 unused)."""
  tables = [device_transforms.bilinear_taps(side, out_size) for side in range(1, max_side + 1)]
  taps = max(weights.shape[1] for _, weights in tables)
  first = np.zeros((max_side + 1, out_size), np.int32)
  weights = np.zeros((max_side + 1, out_size, taps), np.int32)
  for side, (side_first, side_weights) in enumerate(tables, start=1):
    first[side] = side_first
    weights[side, :, :side_weights.shape[1]] = side_weights
  return first, weights


def _resample_boxes(pixels, start, length, out_size: int, axis: int):
  """One Pillow bilinear pass along `axis` (1 rows, 2 columns) of int32 pixels [B, H, W, 3]:
  image b's box [start[b], start[b] + length[b]) -> out_size, rounded and clipped to bytes."""
  in_size = pixels.shape[axis]
  first_table, weight_table = _crop_taps(in_size, out_size)
  first = jnp.asarray(first_table)[length] + start[:, None]  # [B, out]
  weights = jnp.asarray(weight_table)[length]  # [B, out, taps]
  total = jnp.int32(1 << (device_transforms.PRECISION_BITS - 1))
  shape = (pixels.shape[0], out_size, 1, 1) if axis == 1 else (pixels.shape[0], 1, out_size, 1)
  for tap in range(weights.shape[2]):
    index = jnp.minimum(first + tap, in_size - 1).reshape(shape)  # weight 0 past a box's end
    total = total + jnp.take_along_axis(pixels, index, axis=axis) * weights[:, :, tap].reshape(
        shape)
  return jnp.clip(total >> device_transforms.PRECISION_BITS, 0, 255)


@functools.lru_cache(maxsize=None)
def pillow_orders_passes_by_size() -> bool:
  """Whether the installed Pillow runs a resize's vertical pass first for some sizes.

  Pillow used to resample horizontally first, always. The Pillow here (13) goes vertical first
  when the height shrinks and 2 (w - out_w) < h - out_h, h x w being the input (fitted on
  4,332 sizes and checked on 1,478 random ones up to 250 px). One probe where the two rules
  differ (40 x 17 -> 16 x 16) tells which Pillow this is."""
  probe = np.random.default_rng(0).integers(0, 256, (40, 17, 3)).astype(np.uint8)
  resized = np.asarray(Image.fromarray(probe).resize((16, 16), Image.BILINEAR))
  with jax.ensure_compile_time_eval():  # also when first asked while tracing
    pixels = jnp.asarray(probe[None].astype(np.int32))
    start = jnp.zeros((1,), jnp.int32)
    horizontal_first = _resample_boxes(_resample_boxes(pixels, start, start + 17, 16, axis=2),
                                       start, start + 40, 16, axis=1)
    return not np.array_equal(np.asarray(horizontal_first)[0], resized)


def _vertical_first(height, width, out_size: int):
  """Pillow's pass order for boxes of these sizes resized to out_size (see above)."""
  if not pillow_orders_passes_by_size():
    return jnp.zeros(height.shape, bool)
  return (height > out_size) & (2 * (width - out_size) < height - out_size)


def resized_crop(pixels: jnp.ndarray, boxes: jnp.ndarray, out_size: int) -> jnp.ndarray:
  """torchvision's PIL `resized_crop` per image: int32 [B, H, W, 3], int32 boxes [B, 4] (top,
  left, height, width) -> int32 [B, out_size, out_size, 3], each pass rounded to bytes and the
  passes in Pillow's order for the box's size (both orders are computed; each image keeps its
  own)."""
  top, left, height, width = (boxes[:, i] for i in range(4))
  columns_first = _resample_boxes(_resample_boxes(pixels, left, width, out_size, axis=2),
                                  top, height, out_size, axis=1)
  rows_first = _resample_boxes(_resample_boxes(pixels, top, height, out_size, axis=1),
                               left, width, out_size, axis=2)
  return jnp.where(_per_image(_vertical_first(height, width, out_size)), rows_first,
                   columns_first)


# --- the augmentation ----------------------------------------------------------------------------

def _jitter(x, field):
  """ColorJitter's four ops on int32 pixels [B, H, W, 3] in each image's drawn order.

  The hue op, ~8x a blend's cost, runs once: the blends drawn before it, then the hue, then the
  blends drawn after it (8 blend passes in which the other half are identities) instead of
  every op at every position (4 hue passes)."""
  factors = [field['brightness'], field['contrast'], field['saturation']]
  order = jnp.stack([field[f'op_{position}'] for position in range(4)], axis=1).astype(jnp.int32)
  hue_position = jnp.argmax(order == _HUE, axis=1)

  def blend_one(position, x, after_hue: bool):
    op = jax.lax.dynamic_index_in_dim(order, position, axis=1, keepdims=False)
    # One blend serves brightness, contrast and saturation: only the degenerate image differs.
    degenerate = jnp.select(
        [_per_image(op == _BRIGHTNESS), _per_image(op == _CONTRAST)],
        [jnp.zeros_like(x), _per_image(image_mean_luminance(x))],
        luminance(x)[..., None])
    factor = jnp.select([op == _BRIGHTNESS, op == _CONTRAST], factors[:2], factors[2])
    on_this_side = position > hue_position if after_hue else position < hue_position
    return jnp.where(_per_image(on_this_side), blend(degenerate, x, _per_image(factor)), x)

  # Loops, not unrolled steps: each step's image is then materialised once, where XLA fused an
  # unrolled chain into one loop that recomputed earlier steps per use (3x slower).
  x = jax.lax.fori_loop(0, 4, functools.partial(blend_one, after_hue=False), x)
  x = adjust_hue(x, _per_image(field['hue_shift'].astype(jnp.int32), 3))
  return jax.lax.fori_loop(0, 4, functools.partial(blend_one, after_hue=True), x)


def _box_blur_pass(x, radius, inner, far, axis: int, max_radius: int):
  """One of Pillow's box-blur line passes along `axis` (2: rows of pixels, 1: columns) of int32
  pixels [B, H, W, 3], per image (radius, inner and far weights from `pillow_box_blur`):
  (inner * the 2r + 1 nearest + far * the next two + 2^23) >> 24, edges repeated, in uint32 as
  BoxBlur.c (the sum stays below 2^32)."""
  size = x.shape[axis]
  pixels = x.astype(jnp.uint32)
  total = jnp.uint32(1 << 23)
  for offset in range(-max_radius - 1, max_radius + 2):
    distance = abs(offset)
    weight = jnp.where(distance <= radius, inner, jnp.where(distance == radius + 1, far, 0))
    index = np.clip(np.arange(size) + offset, 0, size - 1)
    total = total + jnp.take(pixels, index, axis=axis) * _per_image(weight.astype(jnp.uint32))
  return (total >> 24).astype(jnp.int32)


def gaussian_blur(x, radius, inner, far, max_radius: int):
  """Pillow's `ImageFilter.GaussianBlur`: three box-blur passes along rows, then three along
  columns, each rounded to bytes. Per image: radius, inner, far [B] int32
  (`recipes.pillow_box_blur`); max_radius bounds the radii (static)."""
  for axis in (2,) * recipes.BLUR_PASSES + (1,) * recipes.BLUR_PASSES:
    x = _box_blur_pass(x, radius, inner, far, axis, max_radius)
  return x


def augment(images: jnp.ndarray, params: jnp.ndarray, out_size: int,
            aug_plus: bool = False) -> jnp.ndarray:
  """One view per image, with the loader's draws: MoCo v1 (crop + resize, grayscale, jitter,
  flip) or with `aug_plus` MoCo v2 (crop + resize, jitter with p=0.8, grayscale, blur with
  p=0.5, flip). The flip is applied right after the crop: it commutes with the rest.

  Args:
    images: uint8 [B, H, W, 3] cached images.
    params: float32 [B, len(recipes.AUGMENT_PARAMS)], laid out as that tuple names.
    out_size: the view's side (`data.image_size`).
    aug_plus: the recipe (`data.aug_plus`).
  Returns:
    int32 [B, out_size, out_size, 3] pixels in [0, 255]: the PIL recipe's uint8 view.
  """
  names = recipes.AUGMENT_PARAMS
  field = {name: params[:, i] for i, name in enumerate(names)}
  fired = {name: _per_image(field[name] > 0) for name in ('flip', 'jitter', 'grayscale', 'blur')}
  boxes = params[:, names.index('top'):names.index('width') + 1].astype(jnp.int32)
  x = resized_crop(images.astype(jnp.int32), boxes, out_size)
  x = jnp.where(fired['flip'], x[:, :, ::-1], x)
  grayscale = lambda x: jnp.where(fired['grayscale'],
                                  jnp.broadcast_to(luminance(x)[..., None], x.shape), x)
  if not aug_plus:
    return _jitter(grayscale(x), field)
  x = grayscale(jnp.where(fired['jitter'], _jitter(x, field), x))
  blur = [field[name].astype(jnp.int32) for name in ('blur_radius', 'blur_inner', 'blur_far')]
  max_radius = recipes.pillow_box_blur(recipes.BLUR_SIGMA[1])[0]
  return jnp.where(fired['blur'], gaussian_blur(x, *blur, max_radius), x)
