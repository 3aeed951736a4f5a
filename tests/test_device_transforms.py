"""The on-device eval transform against Pillow/torchvision, and the feature pass that uses it."""

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest
from torchvision import transforms

from configs import test as test_config
from pcl_jax.clustering import bank as bank_lib
from pcl_jax.data import device_transforms
from pcl_jax.data import loaders
from pcl_jax.data import recipes
from pcl_jax.data import sources
from pcl_jax.data import transforms as data_transforms
from pcl_jax import features as features_lib
from pcl_jax import models
from pcl_jax import step as step_lib


def _random_images(count, size, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), np.uint8)


@pytest.mark.parametrize('in_size,out_size', [(84, 96), (8, 37), (32, 37), (100, 84), (300, 96),
                                              (9, 4), (37, 18), (96, 96)])
def test_resize_equals_pillow_bilinear_exactly(in_size, out_size):
  """Upscaling, antialiased shrinking (wider taps), odd ratios and the identity."""
  images = _random_images(3, in_size)
  pillow = np.stack([np.asarray(Image.fromarray(image).resize((out_size, out_size),
                                                              Image.BILINEAR))
                     for image in images])
  resample = device_transforms._resample_axis  # pylint: disable=protected-access
  pixels = resample(jnp.asarray(images, jnp.int32), out_size, axis=2)
  pixels = resample(pixels, out_size, axis=1)
  np.testing.assert_array_equal(np.asarray(pixels), pillow)


def test_bilinear_taps_weights_sum_to_one_in_fixed_point():
  for in_size, out_size in [(84, 96), (300, 96), (9, 4)]:
    first, weights = device_transforms.bilinear_taps(in_size, out_size)
    assert weights.dtype == np.int32 and first.shape == (out_size,)
    sums = weights.sum(axis=1)
    assert np.all(np.abs(sums - (1 << device_transforms.PRECISION_BITS)) <= weights.shape[1])
    assert first.min() >= 0 and first.max() < in_size


@pytest.mark.parametrize('eval_resize', ['center', 'whole'])
@pytest.mark.parametrize('cache_size,image_size', [(84, 84), (37, 32), (32, 32), (18, 16), (8, 16),
                                                   (100, 32), (20, 16)])
def test_eval_transform_equals_torchvision(cache_size, image_size, eval_resize):
  """Resize (8/7 of the crop, or the crop) + CenterCrop + normalise, against the loader's
  transform and torchvision's (the PyTorch reference's Resize(size) + CenterCrop(size) under
  'whole')."""
  images = _random_images(4, cache_size, seed=cache_size)
  on_device = np.asarray(device_transforms.eval_transform(jnp.asarray(images), image_size,
                                                          eval_resize))
  loader = np.stack([data_transforms.eval_transform(image_size, eval_resize)(
      Image.fromarray(image)).numpy() for image in images])
  resize = {'center': int(round(image_size * 8 / 7)), 'whole': image_size}[eval_resize]
  torchvision_reference = transforms.Compose([
      transforms.Resize(resize), transforms.CenterCrop(image_size), transforms.ToTensor(),
      transforms.Normalize(recipes.MEAN, recipes.STD)])
  reference = np.stack([torchvision_reference(Image.fromarray(image)).permute(1, 2, 0).numpy()
                        for image in images])
  assert on_device.shape == (4, image_size, image_size, 3) and on_device.dtype == np.float32
  np.testing.assert_allclose(on_device, loader, rtol=0, atol=1e-6)
  np.testing.assert_allclose(on_device, reference, rtol=0, atol=1e-5)
  if eval_resize == 'whole' and cache_size == image_size:  # the image's own pixels, all of them
    np.testing.assert_allclose(on_device, (images / 255.0 - recipes.MEAN) / recipes.STD,
                               rtol=0, atol=1e-5)


def test_center_crop_offset_rounds_like_torchvision():
  offsets = [device_transforms.center_crop_offset(size, 32) for size in (32, 35, 37, 39)]
  assert offsets == [0, 2, 2, 4]


@pytest.mark.parametrize('process_count', [1, 2])
def test_eval_image_batches_are_the_eval_loaders_rows(process_count):
  """Same rows, order, padding and per-process slices, from a concatenation of two arrays (as
  memory-mapped caches of joined splits are held)."""
  config = test_config.get_config()
  parts = [sources.load_source(config.data, split) for split in ('train', 'val')]
  source = sources.ArraySource(
      sources.ConcatenatedImages([part.images for part in parts]),
      np.concatenate([part.labels for part in parts]), 'digits/train+val')
  dataset = loaders.eval_dataset(source, 16, 'center')
  batch_size = 100
  for process in range(process_count):
    raw = list(loaders.eval_image_batches(source, batch_size, process_index=process,
                                                 process_count=process_count))
    loaded = list(loaders.numpy_batches(loaders.eval_loader(
        dataset, batch_size, num_workers=0, process_index=process, process_count=process_count)))
    assert len(raw) == len(loaded) == loaders.num_eval_batches(len(source), batch_size)
    for images, batch in zip(raw, loaded):
      assert images.dtype == np.uint8 and len(images) == batch_size // process_count
      np.testing.assert_array_equal(images, np.asarray(source.images)[batch['index']])


def test_concatenated_images_slices_across_parts():
  parts = [np.arange(i * 10, i * 10 + n).reshape(n, 1) for i, n in enumerate((3, 4, 2))]
  images = sources.ConcatenatedImages(parts)
  whole = np.concatenate(parts)
  for start, stop in [(0, 9), (2, 5), (3, 7), (6, 9), (4, 4), (-3, None), (8, 20)]:
    np.testing.assert_array_equal(images[start:stop], whole[start:stop])


@pytest.mark.parametrize('eval_resize,resolved', [('auto', 'whole'), ('center', 'center')])
def test_feature_pass_on_device_equals_the_loader_path(eval_resize, resolved):
  config = test_config.get_config()
  config.data.train_split = 'val'  # 359 images: the last batch of 96 is padded
  config.train.batch_size = 8
  config.data.eval_resize = eval_resize
  dataset = loaders.build_train_datasets(config).train_eval
  assert dataset.eval_resize == resolved  # digits are made at the crop size
  model = models.encoder_from_config(config)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)), train=False)
  embed = features_lib.make_embed_fn(model)
  on_device, labels = features_lib.extract_features(embed, variables, dataset, 96, num_workers=0)
  loader, loader_labels = features_lib.extract_features(embed, variables, dataset, 96, num_workers=0,
                                                        transform_on_device=False)
  assert on_device.shape == (len(dataset), config.model.dim)
  np.testing.assert_array_equal(labels, loader_labels)
  np.testing.assert_allclose(np.asarray(on_device), np.asarray(loader), rtol=0, atol=1e-5)


def test_a_custom_transform_goes_through_the_loader():
  """An EvalDataset without `image_size` keeps its own transform (no on-device shortcut)."""
  config = test_config.get_config()
  source = sources.load_source(config.data, 'val')
  flipped = loaders.EvalDataset(source, transforms.Compose([
      transforms.RandomHorizontalFlip(p=1.0), data_transforms.eval_transform(16, 'whole')]))
  model = models.encoder_from_config(config)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)), train=False)
  embed = features_lib.make_embed_fn(model)
  standard, _ = features_lib.extract_features(embed, variables,
                                              loaders.eval_dataset(source, 16, 'whole'), 64, 0)
  custom, _ = features_lib.extract_features(embed, variables, flipped, 64, 0)
  assert not np.allclose(np.asarray(standard), np.asarray(custom), atol=1e-3)


def test_train_step_on_uint8_views_equals_the_step_on_host_normalised_views():
  """The loader ships uint8 views; normalising them inside the step changes nothing."""
  from pcl_jax.run import parallel  # pylint: disable=g-import-not-at-top
  from pcl_jax import state as state_lib  # pylint: disable=g-import-not-at-top
  config = test_config.get_config()
  model = models.encoder_from_config(config, bn_groups=2)
  schedule = state_lib.make_lr_schedule(config.optim, 2, 4)
  tx = state_lib.make_optimizer(config.optim, schedule)
  state = state_lib.create_state(jax.random.PRNGKey(0), model, tx, 16,
                                 config.pcl.num_negatives)
  state = jax.device_put(state, parallel.replicated(parallel.data_mesh()))
  step = step_lib.make_train_step(config, model)
  bank = bank_lib.empty_prototype_bank(config.schedule.num_levels, 8, config.model.dim, 64)
  hparams = step_lib.step_hparams(0.0, 2, 4)
  pixels = {view: _random_images(8, 16, seed) for seed, view in enumerate(('im_q', 'im_k'))}
  normalise = transforms.Compose([Image.fromarray, data_transforms.ToNormalizedHWC()])
  host_normalised = {view: np.stack([normalise(image).numpy() for image in images])
                     for view, images in pixels.items()}
  index = np.arange(8)
  results = [step(jax.tree.map(jnp.copy, state), dict(views, index=index), bank, hparams)
             for views in (pixels, host_normalised)]
  (uint8_state, uint8_metrics), (float_state, float_metrics) = results
  for name in uint8_metrics:
    np.testing.assert_array_equal(np.asarray(uint8_metrics[name]),
                                  np.asarray(float_metrics[name]))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               uint8_state.params, float_state.params)


@pytest.mark.gpu
def test_on_a_gpu_the_transforms_are_still_exact():
  """Integer resampling and float32 normalisation on the accelerator (`pytest -m gpu`)."""
  images = _random_images(16, 84, seed=3)
  on_gpu = np.asarray(jax.jit(_eval_transform_84)(jax.device_put(images, jax.devices('gpu')[0])))
  loader = np.stack([data_transforms.eval_transform(84, 'center')(Image.fromarray(image)).numpy()
                     for image in images])
  np.testing.assert_allclose(on_gpu, loader, rtol=0, atol=1e-6)
  normalised = np.asarray(jax.jit(device_transforms.normalize)(jax.device_put(
      images, jax.devices('gpu')[0])))
  host = np.stack([data_transforms.ToNormalizedHWC()(Image.fromarray(image)).numpy()
                   for image in images])
  np.testing.assert_allclose(normalised, host, rtol=0, atol=1e-6)


def _eval_transform_84(images):
  return device_transforms.eval_transform(images, 84, 'center')
