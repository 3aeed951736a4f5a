"""`data.device_resident`: the decoded training set on the devices, and the epoch's batches made
there, with no host loader.

Why this exists: on a GPU the epoch is bound by the host's loader (benchmarks/RESULTS.md, "On
one GPU": 12 PIL workers at 4.3-4.9k pairs/s against a 38-52k img/s step), and even with
`data.augment_on_device` the workers draw every view and ship every image. A decoded uint8 set
of mini-ImageNet's size is 1.27 GB, which a GPU holds many times over. So the set is placed on
the devices once (`place_images`: replicated, or sharded over the `data` axis when one copy per
device would not fit), and each step's batch is gathered by index and given its views' draws on
the device (`make_batch_fn`, `device_draws`), for the step to augment (`device_augment`). The
E-step's feature pass and the validation kNN's training features read the same copy
(`eval_batches`).

Order and randomness: the batches take the indices of the loader's shuffle (`loaders.epoch_order`,
the same (seed, epoch) permutation), and the draws are keyed by (seed, epoch, step), so a resumed
run draws exactly what the uninterrupted one did.
"""

import functools
import os
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from pcl_jax.configuration import UserError
from pcl_jax.data import device_draws
from pcl_jax.run import parallel

# The share of a device's memory the resident set may take: the rest is for the model, its
# activations, the optimizer and the features.
MEMORY_SHARE = 0.5


def device_memory_bytes(device) -> int:
  """A device's memory: its allocator's limit on a GPU or TPU; on a CPU, the host's physical
  memory divided among its local CPU devices (they share it)."""
  stats = device.memory_stats()
  if stats and stats.get('bytes_limit'):
    return int(stats['bytes_limit'])
  physical = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
  return physical // max(len(jax.local_devices()), 1)


def _gib(num_bytes: float) -> str:
  if num_bytes < 2**30:
    return f'{num_bytes / 2**20:.1f} MiB'
  return f'{num_bytes / 2**30:.2f} GiB'


def resident_sharding(num_bytes: int, mesh, memory_bytes: int):
  """Replicated when a whole copy fits in `MEMORY_SHARE` of each device, else split over the
  `data` axis when a shard does.

  Raises:
    UserError: not even a shard fits; names the set's size and the device memory.
  """
  budget = MEMORY_SHARE * memory_bytes
  if num_bytes <= budget:
    return parallel.replicated(mesh)
  devices = mesh.devices.size
  if num_bytes / devices <= budget:
    return parallel.batch_sharding(mesh)
  raise UserError(
      f'data.device_resident=True: the decoded training set takes {_gib(num_bytes)}, more than '
      f'{MEMORY_SHARE:.0%} of a device\'s {_gib(memory_bytes)} even split over {devices} '
      'device(s); set data.device_resident=False (the host loader), a smaller data.cache_size, '
      'or run on more devices')


def place_images(images: np.ndarray, mesh) -> jax.Array:
  """The uint8 images [N, H, W, 3] on the devices of `mesh` (`resident_sharding`); a sharded
  copy has zero rows appended up to a multiple of the device count, which no index reaches.
  `images` may be a memory-mapped cache or a `sources.ConcatenatedImages` of several splits'
  caches: it is read into host memory once, to be copied to the devices."""
  images = np.asarray(images)
  sharding = resident_sharding(images.nbytes, mesh, device_memory_bytes(jax.local_devices()[0]))
  if sharding.spec:  # split over `data`: rows up to a multiple of the devices
    missing = -images.shape[0] % mesh.devices.size
    images = np.concatenate([images, np.zeros((missing,) + images.shape[1:], images.dtype)])
  return jax.make_array_from_callback(images.shape, sharding, lambda index: images[index])


def _replicated_indices(indices: np.ndarray, mesh) -> jax.Array:
  """The same index array on every device (every process passes the same values)."""
  indices = np.asarray(indices, np.int32)
  return jax.make_array_from_callback(indices.shape, parallel.replicated(mesh),
                                      lambda index: indices[index])


def make_batch_fn(mesh, aug_plus: bool):
  """batch(images, indices [B], seed, epoch, step) -> the step's batch {'image' [B, H, W, 3]
  uint8, 'augment_q', 'augment_k' [B, P] draws, 'index' [B]}, batch-sharded; jitted once (the
  seed, epoch and step are traced)."""

  @functools.partial(jax.jit, out_shardings=parallel.batch_sharding(mesh))
  def batch(images, indices, seed, epoch, step):
    key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), epoch), step)
    query_key, key_key = jax.random.split(key)
    height, width = images.shape[1:3]
    draw = lambda k: device_draws.draw_views(k, indices.shape[0], height, width, aug_plus)
    return {'image': images[indices], 'augment_q': draw(query_key), 'augment_k': draw(key_key),
            'index': indices}

  def call(images, indices, seed: int, epoch: int, step: int):
    return batch(images, _replicated_indices(indices, mesh), seed, epoch, step)
  return call


def train_batches(images: jax.Array, order, batch_size: int, steps: int, batch_fn, *,
                  seed: int, epoch: int) -> Iterator[dict]:
  """The epoch's `steps` batches: consecutive `batch_size` slices of `order` (the loader's
  shuffle), gathered and drawn on the device."""
  order = np.asarray(order)
  for step in range(steps):
    yield batch_fn(images, order[step * batch_size:(step + 1) * batch_size], seed, epoch, step)


@functools.lru_cache(maxsize=None)
def _gather_fn(mesh):
  """images[indices], batch-sharded over `mesh`: one jitted function per mesh, so every feature
  pass reuses its compilation."""
  return jax.jit(lambda images, indices: images[indices],
                 out_shardings=parallel.batch_sharding(mesh))


def eval_batches(images: jax.Array, num_images: int, batch_size: int, mesh) -> Iterator[jax.Array]:
  """The feature pass's uint8 batches in index order from the resident copy, batch-sharded;
  the last batch padded by repeating the last image (as `loaders.eval_image_batches`)."""
  gather = _gather_fn(mesh)
  for start in range(0, num_images, batch_size):
    indices = np.minimum(np.arange(start, start + batch_size), num_images - 1)
    yield gather(images, _replicated_indices(indices, mesh))
