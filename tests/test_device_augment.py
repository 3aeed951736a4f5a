"""Augmentation on the device (`data.augment_on_device`) against Pillow and torchvision."""

import random

import jax
import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter, ImageStat
from torchvision.transforms import _functional_pil as pil_functional
from torchvision.transforms import functional as tv_functional

from configs import test as test_config
from pcl_jax.data import device_augment
from pcl_jax.data import loaders
from pcl_jax.data import recipes
from pcl_jax.data import transforms
from pcl_jax import train


def _every_colour() -> np.ndarray:
  """All 2^24 RGB colours as one 4096 x 4096 uint8 image."""
  index = np.arange(1 << 24, dtype=np.uint32)
  channels = [(index >> shift) & 255 for shift in (16, 8, 0)]
  return np.stack(channels, -1).astype(np.uint8).reshape(4096, 4096, 3)


@pytest.fixture(scope='module')
def every_colour():
  return _every_colour()


def test_luminance_equals_pillow_on_every_colour(every_colour):
  ours = np.asarray(jax.jit(device_augment.luminance)(every_colour.astype(np.int32)))
  np.testing.assert_array_equal(ours, np.asarray(Image.fromarray(every_colour).convert('L')))


def test_hue_equals_torchvision_on_every_colour(every_colour, hue_factor=-0.17):
  """torchvision's PIL adjust_hue on every input colour (a negative factor: the byte shift
  wraps around, 213)."""
  expected = np.asarray(pil_functional.adjust_hue(Image.fromarray(every_colour), hue_factor))
  shift = recipes.hue_shift(hue_factor)
  ours = np.asarray(jax.jit(device_augment.adjust_hue)(every_colour.astype(np.int32), shift))
  np.testing.assert_array_equal(ours, expected)


def test_rgb_to_hsv_and_back_equal_pillow_on_every_colour(every_colour):
  hsv = np.asarray(jax.jit(device_augment.rgb_to_hsv)(every_colour.astype(np.int32)))
  np.testing.assert_array_equal(hsv, np.asarray(Image.fromarray(every_colour).convert('HSV')))
  # every_colour read as HSV bytes: all 2^24 inputs of the inverse.
  rgb = np.asarray(jax.jit(device_augment.hsv_to_rgb)(every_colour.astype(np.int32)))
  np.testing.assert_array_equal(
      rgb, np.asarray(Image.fromarray(every_colour, 'HSV').convert('RGB')))


def test_blend_equals_pillow_for_every_byte_pair():
  """Image.blend for all 65,536 (degenerate, pixel) byte pairs and factors inside [0, 1] (its
  interpolation branch) and outside (its clipped extrapolation branch)."""
  pairs = np.arange(1 << 16)
  degenerate = (pairs >> 8).astype(np.uint8).reshape(256, 256)
  pixels = (pairs & 255).astype(np.uint8).reshape(256, 256)
  factors = np.concatenate([np.random.default_rng(0).uniform(0.6, 1.4, 40), [0.0, 1.0, 2.7]])
  blend = jax.jit(device_augment.blend)
  for factor in factors.astype(np.float32):
    expected = np.asarray(Image.blend(Image.fromarray(degenerate), Image.fromarray(pixels),
                                      float(factor)))
    ours = np.asarray(blend(degenerate.astype(np.int32), pixels.astype(np.int32), factor))
    np.testing.assert_array_equal(ours, expected, err_msg=f'factor {factor}')


def test_contrast_mean_is_pillows_rounded_mean():
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (64, 7, 9, 3)).astype(np.int32)
  images[:8] = images[:8] // 64 * 64  # few levels: means near .5 show up
  ours = np.asarray(device_augment.image_mean_luminance(images))
  for image, mean in zip(images, ours):
    grey = Image.fromarray(image.astype(np.uint8)).convert('L')
    assert mean == int(ImageStat.Stat(grey).mean[0] + 0.5)


def test_resized_crop_equals_pillow_for_any_box():
  """Boxes of every kind: whole image, one pixel, thin strips, larger than the output (Pillow's
  antialiasing taps), and ones touching each border."""
  rng = np.random.default_rng(4)
  boxes = [(0, 0, 30, 26), (5, 7, 1, 1), (0, 0, 30, 1), (3, 0, 1, 26), (29, 25, 1, 1),
           (10, 4, 20, 22), (0, 0, 30, 10), (2, 3, 28, 18)] + [tuple(box) for box in zip(
               *(rng.integers(0, limit, 18) for limit in (15, 13)),
               rng.integers(1, 16, 18), rng.integers(1, 14, 18))]
  images = rng.integers(0, 256, (len(boxes), 30, 26, 3)).astype(np.uint8)
  heights, widths = np.array(boxes)[:, 2], np.array(boxes)[:, 3]
  vertical_first = np.asarray(device_augment._vertical_first(heights, widths, 16))
  assert device_augment.pillow_orders_passes_by_size() == vertical_first.any()
  assert not vertical_first.all()  # Pillow's two pass orders both occur
  ours = np.asarray(jax.jit(device_augment.resized_crop, static_argnums=2)(
      images.astype(np.int32), np.array(boxes, np.int32), 16))
  for image, view, box in zip(images, ours, boxes):
    expected = tv_functional.resized_crop(Image.fromarray(image), *box, [16, 16])
    np.testing.assert_array_equal(view, np.asarray(expected), err_msg=str(box))


def _views_both_ways(images, image_size, aug_plus=False):
  """(the PIL recipe's uint8 views, the device path's draws), each view seeded alike (torch's
  generator, and Python's `random` for MoCo v2's blur)."""
  pil_path = transforms.train_transform(image_size, aug_plus)
  draws = transforms.AugmentationDraws(image_size, aug_plus)
  expected, params = [], []
  for seed, image in enumerate(images):
    torch.manual_seed(seed)
    random.seed(seed)
    expected.append(pil_path(image).numpy())
    torch.manual_seed(seed)
    random.seed(seed)
    params.append(draws(image).numpy())
  return np.stack(expected), np.stack(params)


def _recipe_images(rng, count, shape=(30, 26, 3)):
  """Noisy, pure-colour (saturated) and flat images."""
  images = [rng.integers(0, 256, shape) for _ in range(count)]
  images += [rng.integers(0, 2, shape) * 255 for _ in range(count // 4)]
  images += [np.full(shape, rng.integers(0, 256, 3)) for _ in range(count // 4)]
  return np.stack(images).astype(np.uint8)


@pytest.mark.parametrize('aug_plus', [False, True])
def test_device_augmentation_equals_the_pil_recipe_view_for_view(aug_plus):
  """Same seed, same view: the loader's draws applied on the device equal torchvision's recipe
  in PIL -- MoCo v1 (crop, grayscale, jitter, flip) and v2 (crop, jitter with p=0.8,
  grayscale, blur with p=0.5, flip) -- on noisy, flat and saturated images."""
  images = _recipe_images(np.random.default_rng(2), 40)
  expected, params = _views_both_ways([Image.fromarray(image) for image in images], 16,
                                      aug_plus)
  names = recipes.AUGMENT_PARAMS
  coins = ('grayscale', 'flip') + (('jitter', 'blur') if aug_plus else ())
  for coin in coins:  # both sides of every coin were drawn
    assert 0 < params[:, names.index(coin)].sum() < len(params), coin
  ours = np.asarray(jax.jit(device_augment.augment, static_argnums=(2, 3))(
      images, params, 16, aug_plus))
  np.testing.assert_array_equal(ours, expected)


def test_gaussian_blur_equals_pillow_for_any_sigma():
  """Pillow's GaussianBlur (its box-blur approximation) over MoCo v2's sigma range, ends
  included, on images narrower than the box in one direction too."""
  rng = np.random.default_rng(5)
  sigmas = np.concatenate([[0.1, 2.0, 1.0, 1.5], rng.uniform(0.1, 2.0, 28)])
  images = rng.integers(0, 256, (len(sigmas), 16, 14, 3)).astype(np.uint8)
  images[:4, :, 1:] = images[:4, :, :1]  # a 1-pixel-wide pattern, repeated
  expected = np.stack([np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(float(s))))
                       for image, s in zip(images, sigmas)])
  radius, inner, far = np.array([recipes.pillow_box_blur(float(s)) for s in sigmas]).T
  max_radius = recipes.pillow_box_blur(recipes.BLUR_SIGMA[1])[0]
  ours = jax.jit(device_augment.gaussian_blur, static_argnums=4)(
      images.astype(np.int32), radius, inner, far, max_radius)
  np.testing.assert_array_equal(np.asarray(ours), expected)


def test_loader_batches_carry_the_draws():
  config = test_config.get_config()
  config.data.augment_on_device = True
  datasets = loaders.build_train_datasets(config)
  batch = next(loaders.numpy_batches(loaders.train_loader(
      datasets.train, 8, seed=0, epoch=0, num_workers=0)))
  names = recipes.AUGMENT_PARAMS
  source = datasets.train.source.images
  np.testing.assert_array_equal(batch['image'], np.asarray(source)[batch['index']])
  for name in ('q', 'k'):
    draws = batch[f'augment_{name}']
    assert draws.shape == (8, len(names)) and draws.dtype == np.float32
    top, left, height, width = draws[:, :4].T
    assert (top >= 0).all() and (left >= 0).all() and (height >= 1).all() and (width >= 1).all()
    assert (top + height <= source.shape[1]).all() and (left + width <= source.shape[2]).all()
    order = draws[:, names.index('op_0'):names.index('op_3') + 1]
    np.testing.assert_array_equal(np.sort(order, axis=1), np.tile(np.arange(4), (8, 1)))
    factors = draws[:, names.index('brightness'):names.index('saturation') + 1]
    assert ((factors >= 0.6) & (factors <= 1.4)).all()
    shift = draws[:, names.index('hue_shift')]
    assert (shift == np.round(shift)).all() and ((shift >= 0) & (shift <= 255)).all()
  assert not np.array_equal(batch['augment_q'], batch['augment_k'])  # two views, two draws


def test_training_with_augment_on_device_equals_the_pil_path(tmp_path):
  """Same views, so the same run: the trainer's loader, collation, sharding and step plumbing
  of the draws change no result."""
  config = test_config.get_config()
  config.train.epochs, config.train.steps_per_epoch = 1, 2
  config.data.aug_plus = True  # MoCo v2: the coins, the blur and Python's reseeded `random` too
  states = []
  for on_device in (False, True):
    config.data.augment_on_device = on_device
    states.append(train.train_and_evaluate(config, str(tmp_path / str(on_device))))
  for a, b in zip(*(jax.tree_util.tree_leaves(state) for state in states)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
def test_device_augmentation_equals_pillow_on_the_gpu():
  """The exactness above relies on IEEE float32 division and on no rounding that Pillow does
  being fused away; check both on the GPU."""
  colours = _every_colour()
  expected = np.asarray(pil_functional.adjust_hue(Image.fromarray(colours), 0.3))
  ours = np.asarray(jax.jit(device_augment.adjust_hue)(colours.astype(np.int32),
                                                       recipes.hue_shift(0.3)))
  np.testing.assert_array_equal(ours, expected)
  images = _recipe_images(np.random.default_rng(3), 64)
  for aug_plus in (False, True):
    expected, params = _views_both_ways([Image.fromarray(image) for image in images], 16,
                                        aug_plus)
    np.testing.assert_array_equal(np.asarray(jax.jit(
        device_augment.augment, static_argnums=(2, 3))(images, params, 16, aug_plus)), expected)
