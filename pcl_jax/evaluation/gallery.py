"""Gallery PNGs of a clustering: what each cluster holds, by the images nearest its centroid.

This module owns `eval/gallery_<split>_level_<k>.png`: which clusters are shown and which of
their images (`select_clusters`), the picture (`compose`: one tile per cluster, in order of
size, its images nearest its centroid and its size above them) and the file (`write_gallery`).
Up to `MAX_CLUSTERS` clusters are shown, enough to read at k = 100; with more, an even sample
over the size order, and the picture says so. It never clusters (`assignments` does) and never
scores.
"""

import dataclasses
import math
from typing import Sequence

import numpy as np
from PIL import Image
from PIL import ImageDraw

from pcl_jax.evaluation import assignments as assignments_lib
from pcl_jax.run import files as run_files

MAX_CLUSTERS = 100  # clusters shown: a 10 x 10 grid of tiles
IMAGES_PER_SIDE = 3  # each tile: the 3 x 3 images nearest its cluster's centroid
THUMB = 40  # pixels per image
CAPTION = 14  # pixels of text above each tile and per header line
GAP = 6  # pixels between tiles
BACKGROUND = (255, 255, 255)
EMPTY = (225, 225, 225)  # cells of a cluster with fewer images than a tile holds


@dataclasses.dataclass(frozen=True)
class ShownCluster:
  cluster: int  # cluster id in the assignments
  size: int  # its member count
  rank: int  # its place in the order of size (0: the largest)
  nearest: np.ndarray  # its members' indices, nearest its centroid first (at most a tile's)


def select_clusters(assignments, features, max_clusters: int = MAX_CLUSTERS,
                    per_cluster: int = IMAGES_PER_SIDE**2):
  """The clusters a gallery shows, and how many clusters there are.

  Clusters are ordered by size (largest first, ties by id); when there are more non-empty
  clusters than `max_clusters`, `max_clusters` of them are taken evenly over that order (the
  largest and the smallest included). A cluster's centroid is its members' mean feature; its
  images are the members of largest dot product with it (for L2-normalised features the nearest
  to it, spherically or in L2).

  Returns:
    (list of ShownCluster in size order, number of non-empty clusters).
  """
  assignments = np.asarray(assignments).ravel()
  features = np.asarray(features, np.float32)
  ids, sizes = np.unique(assignments, return_counts=True)
  order = np.lexsort((ids, -sizes))  # by size descending, then id
  ranks = np.arange(order.size)
  if order.size > max_clusters:
    ranks = np.unique(np.round(np.linspace(0, order.size - 1, max_clusters)).astype(int))
  shown = []
  for rank in ranks:
    cluster = int(ids[order[rank]])
    members = np.flatnonzero(assignments == cluster)
    centroid = features[members].mean(axis=0)
    closeness = features[members] @ centroid
    nearest = members[np.argsort(-closeness, kind='stable')[:per_cluster]]
    shown.append(ShownCluster(cluster, int(sizes[order[rank]]), int(rank), nearest))
  return shown, int(order.size)


def sampling_note(num_shown: int, num_clusters: int) -> str:
  """What the gallery shows of the clusters (its second header line)."""
  if num_shown >= num_clusters:
    return f'all {num_clusters} clusters, largest first'
  return (f'a sample: {num_shown} of {num_clusters} clusters, taken evenly over the order of '
          'size, largest first')


def tile_size(per_side: int = IMAGES_PER_SIDE, thumb: int = THUMB) -> tuple:
  """(height, width) of one cluster's tile: its caption and its images."""
  return CAPTION + per_side * thumb, per_side * thumb


def grid_columns(num_tiles: int) -> int:
  return max(1, math.ceil(math.sqrt(num_tiles)))


def tile_origin(position: int, columns: int, per_side: int = IMAGES_PER_SIDE,
                thumb: int = THUMB) -> tuple:
  """(top, left) pixel of the tile at `position` (row-major) below the two header lines."""
  height, width = tile_size(per_side, thumb)
  row, column = divmod(position, columns)
  return 2 * CAPTION + GAP + row * (height + GAP), GAP + column * (width + GAP)


def _thumbnail(image) -> Image.Image:
  picture = Image.fromarray(np.asarray(image, np.uint8)).convert('RGB')
  return picture.resize((THUMB, THUMB), Image.BILINEAR)


def compose(images, shown: Sequence[ShownCluster], num_clusters: int, title: str,
            per_side: int = IMAGES_PER_SIDE) -> np.ndarray:
  """The gallery as a uint8 [H, W, 3] picture: a header (`title`, `sampling_note`), then a
  square grid of tiles in size order, each captioned `#rank n=size` above its nearest images
  (row-major, nearest first). `images` is indexable by image index ([N, S, S, 3] uint8)."""
  columns = grid_columns(len(shown))
  rows = max(1, math.ceil(len(shown) / columns))
  tile_height, tile_width = tile_size(per_side)
  height = 2 * CAPTION + GAP + rows * (tile_height + GAP)
  width = max(GAP + columns * (tile_width + GAP), 420)
  picture = Image.new('RGB', (width, height), BACKGROUND)
  draw = ImageDraw.Draw(picture)
  draw.text((GAP, 1), title, fill=(0, 0, 0))
  draw.text((GAP, CAPTION + 1), sampling_note(len(shown), num_clusters), fill=(0, 0, 0))
  for position, cluster in enumerate(shown):
    top, left = tile_origin(position, columns, per_side)
    draw.text((left, top + 1), f'#{cluster.rank + 1} n={cluster.size}', fill=(0, 0, 0))
    for cell in range(per_side**2):
      cell_row, cell_column = divmod(cell, per_side)
      y, x = top + CAPTION + cell_row * THUMB, left + cell_column * THUMB
      if cell < len(cluster.nearest):
        picture.paste(_thumbnail(images[int(cluster.nearest[cell])]), (x, y))
      else:
        draw.rectangle((x, y, x + THUMB - 1, y + THUMB - 1), fill=EMPTY)
  return np.asarray(picture)


def gallery_path(directory: str, split: str, column: str) -> str:
  """DIR/gallery_<split>_<column>.png (column e.g. level_50)."""
  return assignments_lib.split_file(directory, 'gallery', split, f'_{column}.png')


def write_gallery(path: str, images, assignments, features, title: str) -> str:
  """Selects, composes and writes one clustering's gallery PNG atomically; returns the path."""
  shown, num_clusters = select_clusters(assignments, features)
  picture = Image.fromarray(compose(images, shown, num_clusters, title))
  run_files.write_atomic(path, lambda handle: picture.save(handle, format='PNG', optimize=True),
                         binary=True)
  return path
