"""faiss k-means (the `faiss` backend): faiss.Clustering on the host, with a GPU index where
there is one.

This module owns the hand-off of features to faiss and of its results back to JAX: features
sharded over several devices or processes are first gathered onto one (`on_one_device`), then
cross to host memory once (`np.from_dlpack`, zero-copy for a CPU array), faiss's loop trains on
them (on a GPU with a `GpuIndexFlat`, float16 per setting), and the final nearest-centroid search
takes the device features over DLPack (`torch.from_dlpack` + `faiss.contrib.torch_utils`) without
a host copy on a GPU.
"""

import jax
import jax.numpy as jnp
import numpy as np

from pcl_jax.run import parallel


def import_faiss():
  try:
    import faiss  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return faiss


def sees_gpu(faiss) -> bool:
  get_num_gpus = getattr(faiss, 'get_num_gpus', None)
  return get_num_gpus is not None and get_num_gpus() > 0


def on_one_device(x):
  """`x` whole on one device, gathered once when it is sharded over several devices or
  processes: faiss reads host memory and the DLPack hand-offs (`np.from_dlpack`, faiss-gpu's
  torch bridge) take single-device arrays only. A single-device array or a numpy array is
  returned as it is; an array spread over processes comes back as numpy (every process gets the
  whole of it, `parallel.to_host`)."""
  if not isinstance(x, jax.Array) or len(x.sharding.device_set) == 1:
    return x
  if not x.is_fully_addressable:
    return parallel.to_host(x)
  return jax.device_put(x, min(x.sharding.device_set, key=lambda device: device.id))


def _to_host(x):
  """float32 numpy view of x: zero-copy (DLPack) for a CPU JAX array, a copy from a device."""
  if isinstance(x, jax.Array):
    if all(device.platform == 'cpu' for device in x.devices()):
      return np.from_dlpack(x)
    return np.asarray(jax.device_get(x))
  return np.ascontiguousarray(x, dtype=np.float32)


def _faiss_index(faiss, dim, on_gpu, use_float16, device_id):
  """(assignment index, GPU resources or None); the caller keeps both alive together.

  faiss >= 1.15 refuses new attributes on its objects, so the resources cannot be hung on
  the index: they are returned for the caller to hold while the index lives.
  """
  if not on_gpu:
    return faiss.IndexFlatL2(dim), None
  resources = faiss.StandardGpuResources()
  config = faiss.GpuIndexFlatConfig()
  config.useFloat16 = use_float16
  config.device = device_id
  return faiss.GpuIndexFlatL2(resources, dim, config), resources


def nearest(index, x, x_host, on_gpu):
  """Nearest centroid in `index` for each sample; on GPU the device features go over DLPack."""
  if on_gpu and isinstance(x, jax.Array):
    try:
      import torch  # pylint: disable=g-import-not-at-top
      import faiss.contrib.torch_utils  # pylint: disable=g-import-not-at-top,unused-import
    except ImportError:
      pass
    else:
      # Without a host copy: faiss's torch bridge searches the GPU tensor in place.
      _, labels = index.search(torch.from_dlpack(x), 1)
      return jax.dlpack.from_dlpack(labels[:, 0].to(torch.int32).contiguous())
  _, labels = index.search(x_host, 1)
  return jnp.asarray(labels[:, 0], jnp.int32)


def kmeans(x, k, *, on_gpu, niter, nredo, seed, spherical, max_points, min_points,
           use_float16, weights, init_centroids):
  """faiss.Clustering k-means; returns (centroids [k, D], im2cluster [N])."""
  faiss = import_faiss()
  x_host = _to_host(x)
  num_points, dim = x_host.shape
  clus = faiss.Clustering(dim, k)
  clus.verbose = False
  clus.niter = niter
  clus.nredo = nredo
  clus.seed = int(seed) % (2**31)  # A C int.
  clus.spherical = spherical
  clus.max_points_per_centroid = max_points
  clus.min_points_per_centroid = min_points
  if init_centroids is not None:
    # faiss takes initial centroids from clus.centroids; later redos would restart from the
    # previous result, so one run.
    init = np.ascontiguousarray(init_centroids, dtype=np.float32).reshape(-1)
    faiss.copy_array_to_vector(init, clus.centroids)
    clus.nredo = 1
  device_id = 0
  if on_gpu and isinstance(x, jax.Array):
    device_id = next(iter(x.devices())).id
  index, gpu_resources = _faiss_index(faiss, dim, on_gpu, use_float16, device_id)
  host_weights = None if weights is None else np.asarray(weights, dtype=np.float32)
  clus.train(x_host, index, weights=host_weights)

  centroids = faiss.vector_to_array(clus.centroids).reshape(k, dim)
  if spherical:
    # Already unit norm, except in faiss's N == k corner case, which copies the points raw.
    centroids = centroids / np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-30)
  # Search the returned centroids (not whatever the index last held), so im2cluster is their
  # argmin by construction.
  index.reset()
  index.add(np.ascontiguousarray(centroids))
  im2cluster = nearest(index, x, x_host, on_gpu)
  del index, gpu_resources  # The index first: it uses the resources.
  return jnp.asarray(centroids), im2cluster
