"""The host's image transforms: the reference's two augmentation recipes and the eval transform.

This module owns what torchvision and PIL do to one image: MoCo v1 / v2 augmentation ending in
uint8 HWC (`train_transform`), the eval transform (`eval_transform`), and, for
`data.augment_on_device`, the same random draws without the pixels (`AugmentationDraws`). The
numbers shared with the on-device path live in `recipes`.
"""

import random
from typing import Callable, Sequence

import numpy as np
from PIL import ImageFilter
import torch
from torchvision import transforms

from pcl_jax.data import recipes
from pcl_jax.data.recipes import BLUR_SIGMA
from pcl_jax.data.recipes import MEAN
from pcl_jax.data.recipes import STD


class GaussianBlur:
  """Gaussian blur with sigma ~ U(sigma_min, sigma_max), as MoCo v2 / PCL (PIL radius = sigma)."""

  def __init__(self, sigma: Sequence[float] = (0.1, 2.0)):
    self.sigma = sigma

  def __call__(self, image):
    sigma = random.uniform(self.sigma[0], self.sigma[1])
    return image.filter(ImageFilter.GaussianBlur(radius=sigma))


def _uint8_pixels(image) -> torch.Tensor:
  return torch.from_numpy(np.array(image, dtype=np.uint8, copy=True))


class ToNormalizedHWC:
  """PIL RGB -> float32 HWC tensor, ImageNet-normalised: ToTensor + Normalize, without the CHW
  round trip (one fused pass; 2x cheaper than ToTensor/Normalize/permute at 84 px)."""

  def __init__(self):
    self.offset = torch.tensor(MEAN, dtype=torch.float32) * 255.0
    self.scale = 1.0 / (torch.tensor(STD, dtype=torch.float32) * 255.0)

  def __call__(self, image):
    return _uint8_pixels(image).float().sub_(self.offset).mul_(self.scale)


class ToUint8HWC:
  """PIL RGB -> uint8 HWC tensor: the end of the training augmentations. Normalisation happens
  on the device (`device_transforms.normalize`, equal to `ToNormalizedHWC`), so workers and
  host-to-device copies move a quarter of float32's bytes (loader alone: +16% img/s here)."""

  def __call__(self, image):
    return _uint8_pixels(image)


class AugmentationDraws:
  """One view's random choices under `data.augment_on_device`, without applying them.

  Calls torch's generator (and, for the blur's sigma, Python's `random`) exactly as
  `train_transform(size, aug_plus)` does, in the same order and only when it does (RandomApply
  draws its coin first, and the wrapped op's draws only when the coin says so), so a seeded
  view gets the very crop, flip, colours and blur that the PIL path would give it. Returns
  float32 [len(AUGMENT_PARAMS)].
  """

  def __init__(self, image_size: int, aug_plus: bool):
    recipe = train_transform(image_size, aug_plus).transforms
    self.aug_plus = aug_plus
    self.crop, self.flip = recipe[0], recipe[-2]
    if aug_plus:  # crop, RandomApply(jitter), grayscale, RandomApply(blur), flip, to uint8
      self.jitter_apply, self.grayscale, self.blur_apply = recipe[1], recipe[2], recipe[3]
      self.jitter, self.blur = recipe[1].transforms[0], recipe[3].transforms[0]
    else:  # crop, grayscale, jitter, flip, to uint8
      self.grayscale, self.jitter = recipe[1], recipe[2]

  def _jitter_draws(self):
    order, brightness, contrast, saturation, hue = self.jitter.get_params(
        self.jitter.brightness, self.jitter.contrast, self.jitter.saturation, self.jitter.hue)
    return [int(op) for op in order] + [brightness, contrast, saturation, recipes.hue_shift(hue)]

  def __call__(self, image) -> torch.Tensor:
    box = list(self.crop.get_params(image, self.crop.scale, self.crop.ratio))
    jitter, blur = [0] * 8, [0] * 3  # for ops that did not fire (their draws never happen)
    if self.aug_plus:
      jittered = bool(torch.rand(1) <= self.jitter_apply.p)  # RandomApply: p < u skips
      if jittered:
        jitter = self._jitter_draws()
      grayscale = bool(torch.rand(1) < self.grayscale.p)
      blurred = bool(torch.rand(1) <= self.blur_apply.p)
      if blurred:
        blur = list(recipes.pillow_box_blur(random.uniform(*self.blur.sigma)))
    else:
      jittered, blurred = True, False
      grayscale = bool(torch.rand(1) < self.grayscale.p)
      jitter = self._jitter_draws()
    flip = bool(torch.rand(1) < self.flip.p)
    values = box + [flip, jittered, grayscale, blurred] + jitter + blur
    return torch.tensor([float(value) for value in values], dtype=torch.float32)


def train_transform(image_size: int, aug_plus: bool) -> Callable:
  """The reference's augmentation: MoCo v2 when aug_plus else MoCo v1 (salesforce/PCL).

  The PIL implementations are kept: on 84 px images they are faster than
  torchvision.transforms.v2 on uint8 tensors (0.74 vs 1.23 ms a view, measured here), and they
  are the reference's own ops, so the distribution is exactly the reference's. Views end as
  uint8 HWC; the jitted step normalises them (ToNormalizedHWC's arithmetic, on the device).
  `data.augment_on_device` replaces this with `AugmentationDraws` (the same draws).
  """
  crop = transforms.RandomResizedCrop(image_size, scale=recipes.CROP_SCALE,
                                      ratio=recipes.CROP_RATIO)
  grayscale = transforms.RandomGrayscale(p=recipes.GRAYSCALE_P)
  flip = transforms.RandomHorizontalFlip(p=recipes.FLIP_P)
  if aug_plus:
    augment = [
        crop,
        transforms.RandomApply([transforms.ColorJitter(*recipes.JITTER_V2)],
                               p=recipes.JITTER_P_V2),
        grayscale,
        transforms.RandomApply([GaussianBlur(BLUR_SIGMA)], p=recipes.BLUR_P_V2),
        flip,
    ]
  else:
    augment = [crop, grayscale, transforms.ColorJitter(*recipes.JITTER_V1), flip]
  return transforms.Compose(augment + [ToUint8HWC()])


def eval_transform(image_size: int, eval_resize: str) -> Callable:
  """Resize the short side (to the crop for 'whole', to 8/7 of it for 'center': `eval_resize`
  as `recipes.resolve_eval_resize` gives it), then center-crop; no augmentation."""
  return transforms.Compose([
      transforms.Resize(recipes.eval_resize_size(image_size, eval_resize)),
      transforms.CenterCrop(image_size),
      ToNormalizedHWC(),
  ])
