"""Colour augmentation on the device (`data.color_on_device`) against Pillow and torchvision."""

import jax
import numpy as np
import pytest
import torch
from PIL import Image, ImageStat
from torchvision.transforms import _functional_pil as pil_functional

from configs import test as test_config
from pcl_jax import color_augment
from pcl_jax import configuration
from pcl_jax import input_pipeline
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
  ours = np.asarray(jax.jit(color_augment.luminance)(every_colour.astype(np.int32)))
  np.testing.assert_array_equal(ours, np.asarray(Image.fromarray(every_colour).convert('L')))


def test_hue_equals_torchvision_on_every_colour(every_colour, hue_factor=-0.17):
  """torchvision's PIL adjust_hue on every input colour (a negative factor: the byte shift
  wraps around, 213)."""
  expected = np.asarray(pil_functional.adjust_hue(Image.fromarray(every_colour), hue_factor))
  shift = input_pipeline.hue_shift(hue_factor)
  ours = np.asarray(jax.jit(color_augment.adjust_hue)(every_colour.astype(np.int32), shift))
  np.testing.assert_array_equal(ours, expected)


def test_rgb_to_hsv_and_back_equal_pillow_on_every_colour(every_colour):
  hsv = np.asarray(jax.jit(color_augment.rgb_to_hsv)(every_colour.astype(np.int32)))
  np.testing.assert_array_equal(hsv, np.asarray(Image.fromarray(every_colour).convert('HSV')))
  # every_colour read as HSV bytes: all 2^24 inputs of the inverse.
  rgb = np.asarray(jax.jit(color_augment.hsv_to_rgb)(every_colour.astype(np.int32)))
  np.testing.assert_array_equal(
      rgb, np.asarray(Image.fromarray(every_colour, 'HSV').convert('RGB')))


def test_blend_equals_pillow_for_every_byte_pair():
  """Image.blend for all 65,536 (degenerate, pixel) byte pairs and factors inside [0, 1] (its
  interpolation branch) and outside (its clipped extrapolation branch)."""
  pairs = np.arange(1 << 16)
  degenerate = (pairs >> 8).astype(np.uint8).reshape(256, 256)
  pixels = (pairs & 255).astype(np.uint8).reshape(256, 256)
  factors = np.concatenate([np.random.default_rng(0).uniform(0.6, 1.4, 40), [0.0, 1.0, 2.7]])
  blend = jax.jit(color_augment.blend)
  for factor in factors.astype(np.float32):
    expected = np.asarray(Image.blend(Image.fromarray(degenerate), Image.fromarray(pixels),
                                      float(factor)))
    ours = np.asarray(blend(degenerate.astype(np.int32), pixels.astype(np.int32), factor))
    np.testing.assert_array_equal(ours, expected, err_msg=f'factor {factor}')


def test_contrast_mean_is_pillows_rounded_mean():
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (64, 7, 9, 3)).astype(np.int32)
  images[:8] = images[:8] // 64 * 64  # few levels: means near .5 show up
  ours = np.asarray(color_augment.image_mean_luminance(images))
  for image, mean in zip(images, ours):
    grey = Image.fromarray(image.astype(np.uint8)).convert('L')
    assert mean == int(ImageStat.Stat(grey).mean[0] + 0.5)


def _views_both_ways(images, image_size):
  """(PIL path's uint8 views, device path's (views, colour params)), each view seeded alike."""
  pil_path = input_pipeline.train_transform(image_size, aug_plus=False)
  device_path = input_pipeline.train_transform(image_size, aug_plus=False, color_on_device=True)
  expected, views, params = [], [], []
  for seed, image in enumerate(images):
    torch.manual_seed(seed)
    expected.append(pil_path(image).numpy())
    torch.manual_seed(seed)
    view, color = device_path(image)
    views.append(view.numpy())
    params.append(color.numpy())
  return np.stack(expected), np.stack(views), np.stack(params)


def test_device_colour_ops_equal_the_pil_recipe_view_for_view():
  """Same seed, same view: the loader's crop + flip and drawn parameters, finished on the
  device, equal torchvision's MoCo v1 recipe in PIL, on noisy, flat and saturated images."""
  rng = np.random.default_rng(2)
  images = [rng.integers(0, 256, (30, 26, 3)) for _ in range(40)]
  images += [rng.integers(0, 2, (30, 26, 3)) * 255 for _ in range(12)]  # pure colours
  images += [np.full((30, 26, 3), rng.integers(0, 256, 3)) for _ in range(12)]  # flat
  images = [Image.fromarray(image.astype(np.uint8)) for image in images]
  expected, views, params = _views_both_ways(images, image_size=16)
  names = input_pipeline.COLOR_PARAMS
  assert params[:, names.index('grayscale')].any()  # both grayscale branches were drawn
  assert not params[:, names.index('grayscale')].all()
  ours = np.asarray(jax.jit(color_augment.color_augment)(views, params))
  np.testing.assert_array_equal(ours, expected)


def test_loader_batches_carry_the_colour_parameters():
  config = test_config.get_config()
  config.data.color_on_device = True
  datasets = input_pipeline.build_train_datasets(config)
  batch = next(input_pipeline.numpy_batches(input_pipeline.train_loader(
      datasets.train, 8, seed=0, epoch=0, num_workers=0)))
  size, names = config.data.image_size, input_pipeline.COLOR_PARAMS
  for name in ('q', 'k'):
    assert batch[f'im_{name}'].shape == (8, size, size, 3)
    assert batch[f'im_{name}'].dtype == np.uint8
    color = batch[f'color_{name}']
    assert color.shape == (8, len(names)) and color.dtype == np.float32
    order = color[:, names.index('op_0'):names.index('op_3') + 1]
    np.testing.assert_array_equal(np.sort(order, axis=1), np.tile(np.arange(4), (8, 1)))
    factors = color[:, names.index('brightness'):names.index('saturation') + 1]
    assert ((factors >= 0.6) & (factors <= 1.4)).all()
    shift = color[:, names.index('hue_shift')]
    assert (shift == np.round(shift)).all() and ((shift >= 0) & (shift <= 255)).all()


def test_colour_on_device_with_aug_plus_is_refused():
  config = test_config.get_config()
  config.data.color_on_device, config.data.aug_plus = True, True
  with pytest.raises(configuration.UserError, match='data.aug_plus=False'):
    configuration.validate(config)


def test_training_with_colour_on_device_equals_the_pil_path(tmp_path):
  """Same views, so the same run: the trainer's loader, collation, sharding and step plumbing
  of the colour parameters change no result."""
  config = test_config.get_config()
  config.train.epochs, config.train.steps_per_epoch = 1, 2
  states = []
  for on_device in (False, True):
    config.data.color_on_device = on_device
    states.append(train.train_and_evaluate(config, str(tmp_path / str(on_device))))
  for a, b in zip(*(jax.tree_util.tree_leaves(state) for state in states)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
def test_colour_ops_equal_pillow_on_the_gpu():
  """The exactness above relies on IEEE float32 without fused multiply-adds; check the GPU."""
  colours = _every_colour()
  expected = np.asarray(pil_functional.adjust_hue(Image.fromarray(colours), 0.3))
  ours = np.asarray(jax.jit(color_augment.adjust_hue)(colours.astype(np.int32),
                                                      input_pipeline.hue_shift(0.3)))
  np.testing.assert_array_equal(ours, expected)
  rng = np.random.default_rng(3)
  images = [Image.fromarray(rng.integers(0, 256, (30, 26, 3)).astype(np.uint8))
            for _ in range(32)]
  expected, views, params = _views_both_ways(images, image_size=16)
  np.testing.assert_array_equal(
      np.asarray(jax.jit(color_augment.color_augment)(views, params)), expected)
