"""Tests of pcl_jax.data.device_draws: the on-device draws of `data.device_resident` come from
the distributions of the host's torchvision draws (`transforms.AugmentationDraws`).

Each field of 20,000 views drawn both ways is compared with a two-sample test (chi-squared on the
counts of a discrete field, Kolmogorov-Smirnov on a continuous one) at a 1e-3 level; seeds are
fixed, so the verdicts are too. The same tests reject draws made with a wrong recipe number, so
they can tell distributions apart at this size.
"""

import random

import jax
import numpy as np
from PIL import Image
import pytest
from scipy import stats
import torch

from pcl_jax.data import device_draws
from pcl_jax.data import recipes
from pcl_jax.data import transforms

NUM_VIEWS = 20_000
SIZE = (40, 36)  # height, width of the cached images: not square, so rows and columns differ
LEVEL = 1e-3
FIELD = {name: i for i, name in enumerate(recipes.AUGMENT_PARAMS)}


def host_views(aug_plus: bool) -> np.ndarray:
  torch.manual_seed(0)
  random.seed(0)
  draws = transforms.AugmentationDraws(32, aug_plus)
  image = Image.new('RGB', SIZE[::-1])
  return np.stack([draws(image).numpy() for _ in range(NUM_VIEWS)])


def device_views(aug_plus: bool, seed: int = 0) -> np.ndarray:
  return np.asarray(device_draws.draw_views(jax.random.PRNGKey(seed), NUM_VIEWS, *SIZE, aug_plus))


def p_value(a: np.ndarray, b: np.ndarray) -> float:
  """Two-sample test that a and b come from one distribution: chi-squared over the values'
  counts (values seen fewer than 10 times in all pooled) when they take few values, else KS."""
  values = np.union1d(a, b)
  if values.size > 60:
    return stats.ks_2samp(a, b).pvalue
  counts = np.stack([[np.sum(a == v) for v in values], [np.sum(b == v) for v in values]])
  rare = counts.sum(0) < 10
  if rare.any():
    counts = np.concatenate([counts[:, ~rare], counts[:, rare].sum(1, keepdims=True)], axis=1)
  if counts.shape[1] < 2:
    return 1.0
  return stats.chi2_contingency(counts).pvalue


def field_p_values(host: np.ndarray, device: np.ndarray, aug_plus: bool) -> dict:
  column = lambda views, name: views[:, FIELD[name]]
  result = {}
  for name in ('top', 'left', 'height', 'width', 'flip', 'jitter', 'grayscale', 'blur'):
    result[name] = p_value(column(host, name), column(device, name))
  area = lambda views: column(views, 'height') * column(views, 'width')
  result['area'] = p_value(area(host), area(device))
  jittered = lambda views: views[column(views, 'jitter') > 0]
  host_jitter, device_jitter = jittered(host), jittered(device)
  order = lambda views: sum(column(views, f'op_{i}') * 4**i for i in range(4))
  result['order'] = p_value(order(host_jitter), order(device_jitter))
  for name in ('brightness', 'contrast', 'saturation', 'hue_shift'):
    result[name] = p_value(column(host_jitter, name), column(device_jitter, name))
  if aug_plus:
    blurred = lambda views: views[column(views, 'blur') > 0]
    for name in ('blur_radius', 'blur_inner'):
      result[name] = p_value(column(blurred(host), name), column(blurred(device), name))
  return result


@pytest.fixture(scope='module', params=[False, True], ids=['moco_v1', 'moco_v2'])
def both_ways(request):
  return request.param, host_views(request.param), device_views(request.param)


def test_every_field_has_the_host_distribution(both_ways):
  aug_plus, host, device = both_ways
  assert device.shape == host.shape
  rejected = {name: p for name, p in field_p_values(host, device, aug_plus).items() if p < LEVEL}
  assert not rejected, rejected


def test_boxes_lie_in_the_image_and_unfired_ops_draw_nothing(both_ways):
  aug_plus, _, device = both_ways
  top, left, height, width = (device[:, FIELD[n]] for n in ('top', 'left', 'height', 'width'))
  assert (top >= 0).all() and (left >= 0).all() and (height >= 1).all() and (width >= 1).all()
  assert (top + height <= SIZE[0]).all() and (left + width <= SIZE[1]).all()
  orders = np.sort(device[device[:, FIELD['jitter']] > 0][:, FIELD['op_0']:FIELD['op_3'] + 1])
  np.testing.assert_array_equal(orders, np.broadcast_to(np.arange(4), orders.shape))
  if aug_plus:
    unfired = device[device[:, FIELD['jitter']] == 0]
    assert unfired.size and (unfired[:, FIELD['op_0']:FIELD['hue_shift'] + 1] == 0).all()
    unblurred = device[device[:, FIELD['blur']] == 0]
    assert (unblurred[:, FIELD['blur_radius']:] == 0).all()


@pytest.mark.parametrize('setting, value', [('CROP_SCALE', (0.3, 1.0)), ('GRAYSCALE_P', 0.23),
                                            ('JITTER_V1', (0.4, 0.45, 0.4, 0.4))])
def test_a_wrong_recipe_number_is_told_apart(monkeypatch, setting, value):
  host = host_views(False)
  monkeypatch.setattr(recipes, setting, value)
  p_values = field_p_values(host, device_views(False), False)
  assert min(p_values.values()) < LEVEL, p_values


def test_box_blur_weights_are_pillows():
  sigmas = np.linspace(*recipes.BLUR_SIGMA, 2001, dtype=np.float32)
  want = np.array([recipes.pillow_box_blur(float(s)) for s in sigmas])
  got = np.stack([np.asarray(w) for w in device_draws.box_blur_weights(sigmas)], axis=1)
  np.testing.assert_array_equal(got[:, 0], want[:, 0])
  # The 24-bit weights: within 2 units where Pillow's double-precision steps (and XLA's fused
  # multiply-adds) round otherwise, a relative 1e-7 of the blur.
  assert np.abs(got[:, 1:] - want[:, 1:]).max() <= 2


def test_the_draws_are_a_function_of_the_key():
  first = device_views(True, seed=3)
  np.testing.assert_array_equal(first, device_views(True, seed=3))
  assert not np.array_equal(first, device_views(True, seed=4))
