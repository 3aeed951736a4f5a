"""The numbers both augmentation paths share, torch-free: the host transforms (`transforms`) and
the on-device ones (`device_transforms`, `device_augment`) import them from here.

This module owns the normalisation statistics, the eval transform's resize (and how
`data.eval_resize=auto` resolves), the layout of one view's augmentation draws
(`AUGMENT_PARAMS`) and Pillow's box-blur weights for a Gaussian blur. It imports numpy only.
"""

from typing import Tuple

import numpy as np

# ImageNet statistics, as the reference normalises every dataset with them.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


# `data.eval_resize`, resolved: what the eval transform keeps of an image (pcl_jax/configuration.py).
EVAL_RESIZE_WHOLE = 'whole'  # short side resized to the crop, center crop: all of a square image
EVAL_RESIZE_CENTER = 'center'  # short side resized to 8/7 of the crop, center crop: ImageNet's


def eval_resize_size(image_size: int, eval_resize: str) -> int:
  """The eval transform's resize (short side) before the center crop to `image_size`: the crop
  itself for 'whole' (torchvision's Resize(size) + CenterCrop(size), the PyTorch reference's eval
  transform on small images), 8/7 of it for 'center' (ImageNet's 256 -> 224)."""
  if eval_resize == EVAL_RESIZE_WHOLE:
    return int(image_size)
  if eval_resize == EVAL_RESIZE_CENTER:
    return int(round(image_size * 8 / 7))
  raise ValueError(f'eval_resize={eval_resize!r} is not resolved; use '
                   f'{EVAL_RESIZE_WHOLE!r} or {EVAL_RESIZE_CENTER!r} (resolve_eval_resize)')


def resolve_eval_resize(setting: str, image_size: int, stored_size) -> str:
  """`data.eval_resize` as the eval transform applies it: 'whole' or 'center'.

  'auto' keeps the whole image when the stored images are not larger than 8/7 of the crop
  (`stored_size`, their short side: digits, fake data, mini-ImageNet's 84 px at crop 84, 32 px
  patches at crop 32), as the PyTorch reference's Resize(size) + CenterCrop(size) does: cutting
  their border away would lose what the network was trained to see. Larger photos get ImageNet's
  center crop. `stored_size` None (unknown) resolves 'auto' to 'center'. Pure.
  """
  if setting in (EVAL_RESIZE_WHOLE, EVAL_RESIZE_CENTER):
    return setting
  if setting != 'auto':
    raise ValueError(f'data.eval_resize={setting!r} is unknown; use auto, '
                     f'{EVAL_RESIZE_WHOLE} or {EVAL_RESIZE_CENTER}')
  if stored_size is not None and stored_size <= eval_resize_size(image_size, EVAL_RESIZE_CENTER):
    return EVAL_RESIZE_WHOLE
  return EVAL_RESIZE_CENTER


# One view's augmentation under `data.augment_on_device`, as float32 values in this order:
# RandomResizedCrop's box in the cached image (top, left, height, width); whether the flip, the
# colour jitter (always in MoCo v1, p=0.8 in v2), grayscale and blur (v2, p=0.5) fired;
# ColorJitter's op order (fn_idx: 0 brightness, 1 contrast, 2 saturation, 3 hue), its three
# blend factors and the hue byte shift int32(hue * 255) mod 256; the blur's Pillow box-blur
# line weights (integer radius and the 24-bit weights of the inner and the two far taps,
# `pillow_box_blur`). `pcl_jax.data.device_augment` applies them.
AUGMENT_PARAMS = ('top', 'left', 'height', 'width', 'flip', 'jitter', 'grayscale', 'blur', 'op_0',
                  'op_1', 'op_2', 'op_3', 'brightness', 'contrast', 'saturation', 'hue_shift',
                  'blur_radius', 'blur_inner', 'blur_far')
BLUR_PASSES = 3  # Pillow's GaussianBlur: three box blurs a direction

# The reference's two augmentation recipes (MoCo v1, and v2 under `data.aug_plus`), as numbers:
# torchvision's ops take them on the host (`transforms.train_transform`), and the on-device draws
# of `data.device_resident` (`device_draws`) draw from the same distributions.
CROP_SCALE = (0.2, 1.0)  # RandomResizedCrop's area fraction
CROP_RATIO = (3 / 4, 4 / 3)  # ... and aspect ratio (torchvision's default)
CROP_ATTEMPTS = 10  # torchvision's tries before the central-crop fallback
JITTER_V1 = (0.4, 0.4, 0.4, 0.4)  # ColorJitter(brightness, contrast, saturation, hue)
JITTER_V2 = (0.4, 0.4, 0.4, 0.1)
JITTER_P_V2 = 0.8  # v2 applies the jitter with this probability (v1 always)
GRAYSCALE_P = 0.2
BLUR_P_V2 = 0.5  # v2 only
BLUR_SIGMA = (0.1, 2.0)  # MoCo v2's blur: sigma ~ U(0.1, 2.0)
FLIP_P = 0.5


def hue_shift(hue_factor: float) -> int:
  """The hue byte shift of torchvision's PIL `adjust_hue`: int32(hue_factor * 255) mod 256."""
  return int(np.int32(hue_factor * 255).astype(np.uint8))


def pillow_box_blur(sigma: float) -> Tuple[int, int, int]:
  """(integer radius r, inner weight, far weight) of the box blur by which Pillow's
  `ImageFilter.GaussianBlur(sigma)` approximates a Gaussian (BoxBlur.c, three passes a
  direction): each pass maps a line to (inner * sum of the 2r + 1 nearest pixels + far * the
  two next ones + 2^23) >> 24, edges repeated. Computed with Pillow's float and double steps
  (_gaussian_blur_radius, ImagingHorizontalBoxBlur)."""
  f32 = np.float32
  radius = f32(sigma)  # the C float Pillow parses
  variance = f32(radius * radius) / f32(BLUR_PASSES)
  length = f32(np.sqrt(12.0 * np.float64(variance) + 1.0))
  whole = f32(np.floor((np.float64(length) - 1.0) / 2.0))
  fraction = (f32(2) * whole + f32(1)) * (whole * (whole + f32(1)) - f32(3) * variance)
  fraction = fraction / (f32(6) * (variance - (whole + f32(1)) * (whole + f32(1))))
  box_radius = f32(whole + fraction)
  inner = int(f32(1 << 24) / (box_radius * f32(2) + f32(1)))
  integer_radius = int(box_radius)
  return integer_radius, inner, ((1 << 24) - (2 * integer_radius + 1) * inner) // 2
