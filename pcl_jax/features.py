"""The feature pass: every image of a split through an encoder in eval mode, in index order.

This module owns what the E-step clusters and what evaluation scores: the jitted, sharded
embedding of a batch (`make_embed_fn`), the batches of a split with the eval transform on the
device (`feature_pass_batches`), and the whole split's features (`extract_features`). It never
trains, clusters or scores.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from pcl_jax.data import device_transforms
from pcl_jax.data import loaders
from pcl_jax.data import resident as resident_lib
from pcl_jax import models
from pcl_jax.run import parallel


def make_embed_fn(model, feature_layer: str = 'head', mesh=None):
  """Jitted eval-mode embedding of a batch: L2-normalised head output, or backbone features.

  Variables replicated, images and embeddings split over the mesh's `data` axis.
  """
  mesh = mesh or parallel.data_mesh()

  @functools.partial(jax.jit, in_shardings=(parallel.replicated(mesh),
                                            parallel.batch_sharding(mesh)),
                     out_shardings=parallel.batch_sharding(mesh))
  def embed(variables, images):
    embedding, backbone = model.apply(variables, images, train=False, return_backbone=True)
    if feature_layer == 'backbone':
      return models.l2_normalize(backbone)
    return embedding

  return embed


def feature_pass_batches(dataset, batch_size: int, num_workers: int, mesh,
                         transform_on_device: bool = True, resident=None):
  """The network's input batches of a feature pass over an EvalDataset, in index order: global
  device arrays, batch-sharded over `mesh`, each process loading its own slice.

  With the standard eval transform (`dataset.image_size` and `dataset.eval_resize` set) and
  `transform_on_device`, the host only slices uint8 rows out of the cache and the transform runs
  on the device (`device_transforms`, equal to torchvision's); otherwise a torch loader with
  `num_workers` workers applies `dataset.transform`. `resident`, the dataset's images already
  on the devices (`data.device_resident`), is read instead of the host's cache. The last batch
  is padded to full size.
  """
  sharding = parallel.batch_sharding(mesh)
  where = dict(process_index=jax.process_index(), process_count=jax.process_count())
  on_device = bool(transform_on_device and dataset.image_size and dataset.eval_resize)
  if resident is not None:  # global device arrays already
    batches = resident_lib.eval_batches(resident, len(dataset), batch_size, mesh)
  else:
    if on_device:
      host_batches = loaders.eval_image_batches(dataset.source, batch_size, **where)
    else:
      loader = loaders.eval_loader(dataset, batch_size, num_workers=num_workers, **where)
      host_batches = (batch['image'] for batch in loaders.numpy_batches(loader))
    batches = (parallel.global_batch({'image': images}, sharding)['image']
               for images in host_batches)
  transform = lambda images: images
  if on_device or resident is not None:
    transform = device_transforms.jitted_eval_transform(dataset.image_size, dataset.eval_resize,
                                                        mesh)
  for images in batches:
    yield transform(images)


def extract_features(embed_fn, variables, dataset, batch_size: int, num_workers: int,
                     progress: bool = False, mesh=None, transform_on_device: bool = True,
                     resident=None):
  """Embeds a whole EvalDataset in index order, sharded over `mesh` (default: all devices).

  Every batch is full (the last is padded), so `embed_fn` compiles once; padding rows are
  dropped at the end. Batches come from `feature_pass_batches` (the eval transform on the device
  unless `transform_on_device` is False or the dataset has its own transform; from `resident`,
  the images on the devices, when given).

  Returns:
    (features [N, D] jax array on device, batch-sharded; labels [N] numpy int64, or None for
    unlabelled images).
  """
  mesh = mesh or parallel.data_mesh()
  batches = feature_pass_batches(dataset, batch_size, num_workers, mesh, transform_on_device,
                                 resident)
  chunks = [embed_fn(variables, images) for images in tqdm.tqdm(
      batches, total=loaders.num_eval_batches(len(dataset), batch_size),
      disable=not progress, desc='features', leave=False)]
  num_images = len(dataset)
  features = jnp.concatenate(chunks)[:num_images]
  labels = dataset.source.labels
  return features, None if labels is None else np.asarray(labels[:num_images])
