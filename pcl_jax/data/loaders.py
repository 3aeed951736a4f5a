"""Datasets and loaders: numpy batches of augmented pairs for training, and of eval views.

This module owns everything between an image source and a numpy batch: the torch datasets, the
seeded sampler that slices global batches per process, collation, and what a run builds
(`build_train_datasets`, `build_eval_dataset`). It never touches JAX arrays or model state.
Training batches are dicts `{'im_q', 'im_k': [B, H, W, 3] uint8 NHWC, 'index': [B] int64}` (the
jitted step normalises them: `device_transforms.normalize`), or with `data.augment_on_device`
`{'image': [B, H, W, 3] uint8 cached images, 'augment_q', 'augment_k': [B, len(AUGMENT_PARAMS)]
float32 draws, 'index'}` (the step augments: `device_augment`); evaluation batches `{'image',
'label', 'index'}` (float32, normalised; the feature pass itself reads uint8 rows,
`eval_image_batches`). Augmentation randomness is a function of (seed, epoch, index) only, so a
resumed run replays the same order and the same augmentations whatever `num_workers` is.
"""

import dataclasses
import logging
import random
import warnings
from typing import Optional

import numpy as np
from PIL import Image
import torch
from torch.utils import data as torch_data

from pcl_jax.configuration import UserError
from pcl_jax.data import sources
from pcl_jax.data.sources import ArraySource
from pcl_jax.data import transforms

# Images in flight across all loader workers (each worker prefetches its share).
_BATCHES_IN_FLIGHT = 8


class TwoCropDataset(torch_data.Dataset):
  """Two independent augmentations of the same image, plus its index: (im_q, im_k, index)."""

  def __init__(self, source, transform):
    self.source, self.transform = source, transform

  def __len__(self):
    return len(self.source)

  def __getitem__(self, index):
    image = self.source.image(index)
    return self.transform(image), self.transform(image), index


class EvalDataset(torch_data.Dataset):
  """One deterministic view per image: (image, label, index), indices aligned with training.

  `image_size` and `eval_resize` are set when `transform` is `eval_transform(image_size,
  eval_resize)` (see `eval_dataset`): the feature pass then runs that transform on the device
  from uint8 rows of the cache (`eval_image_batches`, `device_transforms`) instead of through
  loader workers.
  """

  def __init__(self, source, transform, image_size: Optional[int] = None,
               eval_resize: Optional[str] = None):
    self.source, self.transform, self.image_size = source, transform, image_size
    self.eval_resize = eval_resize

  def __len__(self):
    return len(self.source)

  def __getitem__(self, index):
    labels = self.source.labels  # None: unlabelled images, given label -1 (never scored)
    label = -1 if labels is None else int(labels[index])
    return self.transform(self.source.image(index)), label, index


class _SeededSamples(torch_data.Dataset):
  """Reseeds the augmentation RNGs before each sample from (epoch seed, index).

  The augmentations of sample i in an epoch then do not depend on which worker draws it, on its
  position in the batch or on num_workers. torchvision's transforms draw from torch's default
  generator, GaussianBlur from `random`; reseeding both costs ~5 us a sample.
  """

  def __init__(self, dataset, base_seed: int):
    self.dataset, self.base_seed = dataset, base_seed

  def __len__(self):
    return len(self.dataset)

  def __getitem__(self, index):
    sample_seed = self.base_seed * 2**32 + int(index)  # unique per (seed, epoch, index)
    torch.default_generator.manual_seed(sample_seed)
    random.seed(sample_seed)
    return self.dataset[index]


def _collate_train(samples):
  """{'im_q', 'im_k', 'index'}, or from `DrawsOnlyDataset` {'image', 'augment_q', 'augment_k',
  'index'}."""
  if len(samples[0]) == 4:
    image, augment_q, augment_k, index = zip(*samples)
    return {'image': torch.stack(image), 'augment_q': torch.stack(augment_q),
            'augment_k': torch.stack(augment_k),
            'index': torch.as_tensor(index, dtype=torch.int64)}
  im_q, im_k, index = zip(*samples)
  return {'im_q': torch.stack(im_q), 'im_k': torch.stack(im_k),
          'index': torch.as_tensor(index, dtype=torch.int64)}


def _collate_eval(samples):
  image, label, index = zip(*samples)
  return {'image': torch.stack(image), 'label': torch.as_tensor(label, dtype=torch.int64),
          'index': torch.as_tensor(index, dtype=torch.int64)}


def epoch_seed(seed: int, epoch: int) -> int:
  """One integer per (seed, epoch): seeds the sampler and the augmentation RNGs of that epoch."""
  return (seed * 1_000_003 + epoch * 7919) % (2**31 - 1)


def epoch_order(num_images: int, seed: int, epoch: int) -> list:
  """The epoch's shuffle of the training indices: a torch permutation seeded by `epoch_seed`
  (`train_loader`'s batches, and `data.device_resident`'s)."""
  generator = torch.Generator().manual_seed(epoch_seed(seed, epoch))
  return torch.randperm(num_images, generator=generator).tolist()


def _prefetch_factor(num_workers: int) -> Optional[int]:
  # Keep ~_BATCHES_IN_FLIGHT batches ready in total: enough to hide a slow sample, bounded memory
  # (8 ResNet-50 batches of 256 pairs at 224 px are 2.5 GB).
  if not num_workers:
    return None
  return max(2, -(-_BATCHES_IN_FLIGHT // num_workers))


class _ProcessSliceBatches(torch_data.Sampler):
  """Groups an index order into global batches and yields this process's slice of each.

  With P processes each loads `batch_size / P` images per step: disjoint shards whose union, in
  process order, is exactly the single-process batch. `pad_to_full=True` (evaluation) repeats
  the last index so the final global batch is full too; callers drop rows past N.
  """

  def __init__(self, order, batch_size, process_index, process_count, pad_to_full):
    self.order, self.batch_size = order, batch_size
    self.process_index, self.process_count = process_index, process_count
    self.pad_to_full = pad_to_full
    self.local = batch_size // process_count

  def _global_batches(self):
    indices = list(self.order)
    if self.pad_to_full and indices and len(indices) % self.batch_size:
      indices += [indices[-1]] * (self.batch_size - len(indices) % self.batch_size)
    for start in range(0, len(indices) - self.batch_size + 1, self.batch_size):
      yield indices[start:start + self.batch_size]

  def __iter__(self):
    first = self.process_index * self.local
    for batch in self._global_batches():
      yield batch[first:first + self.local]

  def __len__(self):
    count = len(self.order)
    if self.pad_to_full:
      return num_eval_batches(count, self.batch_size)
    return count // self.batch_size


def train_loader(dataset, batch_size: int, *, seed: int, epoch: int, num_workers: int,
                 process_index: int = 0, process_count: int = 1):
  """Shuffled loader of one epoch; same (seed, epoch) -> same batches, for any num_workers.

  `batch_size` is the global batch; with several processes (multi-host) each yields its own
  disjoint `batch_size / process_count` slice of every global batch.

  Pinned memory is not used: JAX copies host numpy arrays itself (jax.device_put), so torch's
  page-locked buffers would only add a copy. Workers fork from the trainer and read the
  memory-mapped cache; they never open image files, so a bad file cannot hang them.
  """
  # With num_workers=0 the per-sample reseeding happens in this process: its global torch and
  # `random` RNG states are then set by the last sample drawn.
  base_seed = epoch_seed(seed, epoch)
  batches = _ProcessSliceBatches(epoch_order(len(dataset), seed, epoch), batch_size,
                                 process_index, process_count, pad_to_full=False)
  return torch_data.DataLoader(
      _SeededSamples(dataset, base_seed), batch_sampler=batches,
      num_workers=num_workers, collate_fn=_collate_train, persistent_workers=False,
      prefetch_factor=_prefetch_factor(num_workers))


def eval_loader(dataset, batch_size: int, *, num_workers: int, process_index: int = 0,
                process_count: int = 1):
  """Loader in dataset-index order; the last global batch is padded by repeating the last image.

  Every batch has `batch_size / process_count` rows (static shapes: no recompilation); rows past
  len(dataset) are padding that callers drop.
  """
  batches = _ProcessSliceBatches(range(len(dataset)), batch_size, process_index, process_count,
                                 pad_to_full=True)
  return torch_data.DataLoader(dataset, batch_sampler=batches, num_workers=num_workers,
                               collate_fn=_collate_eval,
                               prefetch_factor=_prefetch_factor(num_workers))


def eval_image_batches(source: ArraySource, batch_size: int, *, process_index: int = 0,
                       process_count: int = 1):
  """The batches of `eval_loader` as raw uint8 images [b, S, S, 3], read in this process.

  Same indices, order, per-process slices and padding as `eval_loader` (the last global batch
  repeats the last image), but no workers and no transform: rows are sliced straight out of the
  (memory-mapped) cache, for `device_transforms.eval_transform` to finish on the device.
  """
  batches = _ProcessSliceBatches(range(len(source)), batch_size, process_index, process_count,
                                 pad_to_full=True)
  for indices in batches:
    indices = np.asarray(indices)
    first = int(indices.min())
    block = np.asarray(source.images[first:int(indices.max()) + 1])
    yield block[indices - first]


def num_eval_batches(num_images: int, batch_size: int) -> int:
  """Batches of `eval_loader` / `eval_image_batches` over `num_images` (the last is padded)."""
  return -(-num_images // batch_size)


def numpy_batches(loader):
  """Yields the loader's batches as dicts of numpy arrays (zero-copy views of the tensors)."""
  with warnings.catch_warnings():
    # Starting the workers forks this process, and JAX warns that forking a multithreaded
    # process may deadlock. The workers run only numpy, PIL and torch on the memory-mapped cache,
    # never JAX, so the threads JAX leaves behind in the parent do not matter to them.
    warnings.filterwarnings('ignore', message=r'os\.fork\(\) was called', category=RuntimeWarning)
    batches = iter(loader)
  for batch in batches:
    yield {name: value.numpy() for name, value in batch.items()}


class DrawsOnlyDataset(torch_data.Dataset):
  """For `data.augment_on_device`: the cached image once, with the draws of its two views:
  (uint8 HWC pixels, params_q, params_k, index). The jitted step crops, flips and colours."""

  def __init__(self, source, draws):
    self.source, self.draws = source, draws
    # The draws read only the image size (all cached images share it): a blank stand-in of
    # that size saves building a PIL image from the pixels per sample.
    height, width = source.images.shape[1:3]
    self._stand_in = Image.new('RGB', (width, height))

  def __len__(self):
    return len(self.source)

  def __getitem__(self, index):
    pixels = np.array(self.source.images[index], dtype=np.uint8)
    views = (self.draws(self._stand_in), self.draws(self._stand_in))
    return (torch.from_numpy(pixels),) + views + (index,)


@dataclasses.dataclass
class Datasets:
  """The three views of the data a run needs."""
  train: TwoCropDataset  # augmented pairs of the training split
  train_eval: EvalDataset  # the same images, eval transform, same indices (for the E-step)
  num_train: int


def check_split_fits_batch(num_images: int, batch_size: int, split: str,
                           setting: str = 'data.train_split') -> None:
  """A training split must hold at least one batch (the loader drops partial batches)."""
  if num_images < batch_size:
    raise UserError(f'{setting}={split!r} has {num_images} images, fewer than one batch of '
                    f'train.batch_size={batch_size}; use a smaller train.batch_size or a larger '
                    'split')


def _log_pretraining_split(config, source: ArraySource) -> None:
  data = config.data
  if source.labels is None:
    logging.info('pretraining on %s: %d unlabelled images (one split, which data.train_split=%r '
                 'and data.eval_split=%r both name)', source.name, len(source), data.train_split,
                 data.eval_split)
    return
  logging.info('pretraining on %s (data.train_split=%r): %d images, %d classes', source.name,
               data.train_split, len(source), len(np.unique(source.labels)))
  if data.name != 'mini_imagenet':
    return
  if sources.split_names(data.train_split) == ['train']:
    logging.info('mini-ImageNet: pretraining on the train classes only, so few-shot numbers '
                 'on %r are comparable with published ones', data.eval_split)
  else:
    logging.warning('mini-ImageNet: data.train_split=%r pretrains on the val/test classes too '
                    '(as the research notes did); few-shot numbers are only comparable with '
                    'published ones when pretraining on train', data.train_split)


_LOGGED_EVAL_RESIZE = set()


def eval_resize(data_config) -> str:
  """`data.eval_resize` resolved ('whole' or 'center', `sources.resolved_eval_resize`); what
  'auto' chose is logged once per dataset and crop."""
  resolved = sources.resolved_eval_resize(data_config)
  key = (data_config.name, str(data_config.root), int(data_config.image_size), resolved)
  if data_config.eval_resize == 'auto' and key not in _LOGGED_EVAL_RESIZE:
    _LOGGED_EVAL_RESIZE.add(key)
    logging.info('eval transform: data.eval_resize=auto -> %s (stored images %s px, crop %d)',
                 resolved, sources.stored_image_size(data_config), data_config.image_size)
  return resolved


def build_train_datasets(config) -> Datasets:
  """Training pairs and their index-aligned eval view, from `config.data`."""
  source = sources.load_source(config.data, config.data.train_split, setting='data.train_split')
  check_split_fits_batch(len(source), config.train.batch_size, config.data.train_split)
  _log_pretraining_split(config, source)
  resize = eval_resize(config.data)
  if config.data.augment_on_device:
    train = DrawsOnlyDataset(source, transforms.AugmentationDraws(config.data.image_size,
                                                                  config.data.aug_plus))
  else:
    train = TwoCropDataset(source, transforms.train_transform(config.data.image_size,
                                                              config.data.aug_plus))
  return Datasets(train=train,
                  train_eval=eval_dataset(source, config.data.image_size, resize),
                  num_train=len(source))


def build_eval_dataset(config, split: Optional[str] = None) -> EvalDataset:
  """Eval-transform dataset of `split` (default `data.eval_split`)."""
  setting = 'data.eval_split' if split is None else 'data split'
  source = sources.load_source(config.data, split or config.data.eval_split, setting=setting)
  return eval_dataset(source, config.data.image_size, eval_resize(config.data))


def eval_dataset(source: ArraySource, image_size: int, eval_resize: str) -> EvalDataset:
  """`source` under the standard eval transform (which the feature pass runs on the device);
  `eval_resize` is 'whole' or 'center' (`sources.resolved_eval_resize`)."""
  return EvalDataset(source, transforms.eval_transform(image_size, eval_resize),
                     image_size=image_size, eval_resize=eval_resize)
