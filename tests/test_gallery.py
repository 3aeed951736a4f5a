"""Galleries: which clusters are shown and which of their images (against a numpy reference),
where each lands in the picture, the note when only a sample of the clusters is shown, and the
PNG file. Arrays only: no training."""

import numpy as np
from PIL import Image

from pcl_jax.evaluation import gallery


def _unit(rows):
  return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def _solid_images(count):
  """Image i is one solid colour of its own, so a pasted thumbnail names its image."""
  colours = np.stack([np.arange(count) * 7 % 256, np.arange(count) * 13 % 256,
                      np.arange(count) // 2 % 256], axis=1).astype(np.uint8)
  return np.broadcast_to(colours[:, None, None, :], (count, 12, 12, 3)).copy()


def test_clusters_in_order_of_size_with_the_members_nearest_their_mean():
  rng = np.random.default_rng(0)
  features = _unit(rng.normal(size=(60, 5)))
  assignments = np.repeat([4, 0, 9], [10, 30, 20])  # sizes 10, 30, 20
  shown, num_clusters = gallery.select_clusters(assignments, features, per_cluster=4)
  assert num_clusters == 3
  assert [(c.cluster, c.size, c.rank) for c in shown] == [(0, 30, 0), (9, 20, 1), (4, 10, 2)]
  for cluster in shown:  # the reference: smallest L2 distance to the normalised member mean
    members = np.flatnonzero(assignments == cluster.cluster)
    mean = _unit(features[members].mean(axis=0, keepdims=True))[0]
    distance = ((features[members] - mean) ** 2).sum(axis=1)
    np.testing.assert_array_equal(cluster.nearest, members[np.argsort(distance)[:4]])


def test_more_clusters_than_shown_are_sampled_evenly_and_the_picture_says_so():
  rng = np.random.default_rng(1)
  sizes = np.arange(1, 151)  # 150 clusters, cluster c has c + 1 members
  assignments = np.repeat(np.arange(150), sizes)
  features = _unit(rng.normal(size=(assignments.size, 4)))
  shown, num_clusters = gallery.select_clusters(assignments, features, max_clusters=100)
  assert num_clusters == 150 and len(shown) == 100
  ranks = [cluster.rank for cluster in shown]
  assert ranks[0] == 0 and ranks[-1] == 149 and ranks == sorted(set(ranks))
  assert max(np.diff(ranks)) <= 2  # even over the order of size
  assert [cluster.size for cluster in shown] == sorted((c.size for c in shown), reverse=True)
  assert gallery.sampling_note(100, 150).startswith('a sample: 100 of 150 clusters')
  assert gallery.sampling_note(10, 10) == 'all 10 clusters, largest first'


def test_each_tile_shows_its_clusters_nearest_images_in_the_grid():
  rng = np.random.default_rng(2)
  count = 23
  images = _solid_images(count)
  features = _unit(rng.normal(size=(count, 3)))
  assignments = np.repeat([0, 1, 2, 3, 4], [9, 6, 4, 3, 1])
  shown, num_clusters = gallery.select_clusters(assignments, features)
  picture = gallery.compose(images, shown, num_clusters, 'title')
  columns = gallery.grid_columns(5)
  assert columns == 3
  tile_height, tile_width = gallery.tile_size()
  last_top, _ = gallery.tile_origin(len(shown) - 1, columns)
  assert picture.shape[0] == last_top + tile_height + gallery.GAP
  assert picture.shape[1] >= gallery.GAP + columns * (tile_width + gallery.GAP)
  side = gallery.IMAGES_PER_SIDE
  for position, cluster in enumerate(shown):
    top, left = gallery.tile_origin(position, columns)
    for cell in range(side**2):
      row, column = divmod(cell, side)
      y = top + gallery.CAPTION + row * gallery.THUMB + gallery.THUMB // 2
      x = left + column * gallery.THUMB + gallery.THUMB // 2
      expected = (images[cluster.nearest[cell], 0, 0] if cell < len(cluster.nearest)
                  else gallery.EMPTY)
      np.testing.assert_array_equal(picture[y, x], expected)


def test_write_gallery_writes_a_png_of_the_composed_picture(tmp_path):
  rng = np.random.default_rng(3)
  images = _solid_images(40)
  features = _unit(rng.normal(size=(40, 3)))
  assignments = rng.integers(0, 7, 40)
  path = gallery.write_gallery(gallery.gallery_path(str(tmp_path), 'test', 'level_7'), images,
                               assignments, features, 'split test, level_7')
  assert path == str(tmp_path / 'gallery_test_level_7.png')
  shown, num_clusters = gallery.select_clusters(assignments, features)
  with Image.open(path) as written:
    np.testing.assert_array_equal(
        np.asarray(written.convert('RGB')),
        gallery.compose(images, shown, num_clusters, 'split test, level_7'))
