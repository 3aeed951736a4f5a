"""Data: image sources, the decoded-image cache, the two augmentation recipes, numpy batches.

This module owns everything between files on disk and a numpy batch: finding the images of a
split (mini-ImageNet in its CSV or folder layout, any torchvision ImageFolder tree, sklearn digits,
torchvision FakeData), decoding them once into a memory-mapped uint8 cache, the transforms,
samplers and collation. It never touches JAX arrays or model state. Training batches are dicts
`{'im_q', 'im_k': [B, H, W, 3] uint8 NHWC, 'index': [B] int64}` (the jitted step normalises
them: `device_transforms.normalize`), or with `data.augment_on_device` `{'image': [B, H, W, 3]
uint8 cached images, 'augment_q', 'augment_k': [B, len(AUGMENT_PARAMS)] float32 draws, 'index'}`
(the step augments: `device_augment`); evaluation batches `{'image', 'label', 'index'}`
(float32, normalised; the feature pass itself reads uint8 rows, `eval_image_batches`). Augmentation
randomness is a function of (seed, epoch, index) only, so a resumed run replays the same order
and the same augmentations whatever `num_workers` is.

Data layout (data.root = DIR):
- `mini_imagenet`, Ravi & Larochelle layout: `DIR/images/*.jpg` and `DIR/{train,val,test}.csv`
  (header `filename,label`); or the folder layout `DIR/{train,val,test}/<wnid>/*.jpg`. Images are
  cached at 84x84 (each image squashed to 84x84 with Lanczos, the standard mini-ImageNet
  preprocessing; a no-op for the usual 84x84 release).
- `image_folder`: `DIR/<split>/<class>/**/<image>`; a DIR that holds class folders directly is one
  split named `all`. Images are cached at the eval resize size (short side resized, bilinear,
  then center-cropped to a square), so training crops come from that central square.
Splits join with '+' ('train+val+test'); labels are the indices of the sorted class names over
the union of every split of DIR, so a class has the same label in every split.
"""

import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import os
import random
import re
import shutil
import socket
import time
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageFilter
import torch
from torch.utils import data as torch_data
from torchvision import transforms
from torchvision.transforms import functional as tv_functional
import tqdm

from pcl_jax import configuration
from pcl_jax.configuration import UserError

# ImageNet statistics, as the reference normalises every dataset with them.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
DATASETS = configuration.DATASETS
# torchvision's ImageFolder extensions (torchvision.datasets.folder.IMG_EXTENSIONS).
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')
MINI_IMAGENET_SIZE = 84
# (classes, images) of the standard Ravi & Larochelle split.
MINI_IMAGENET_SPLITS = {'train': (64, 38400), 'val': (16, 9600), 'test': (20, 12000)}
CACHE_FORMAT = 1
# Images in flight across all loader workers (each worker prefetches its share).
_BATCHES_IN_FLIGHT = 8


@dataclasses.dataclass(frozen=True)
class ArraySource:
  """Decoded images held in one uint8 array [N, H, W, 3] (in memory or memory-mapped).

  `images` may also be a `ConcatenatedImages` view (splits joined with '+'); `class_names[l]` is
  the name of label l when the source has named classes.
  """
  images: np.ndarray
  labels: np.ndarray
  name: str = ''
  class_names: Tuple[str, ...] = ()

  def __len__(self):
    return len(self.labels)

  def image(self, index: int) -> Image.Image:
    return Image.fromarray(np.asarray(self.images[index]))


class ConcatenatedImages:
  """Read-only concatenation of image arrays (memory-mapped caches) that copies nothing."""

  def __init__(self, parts: Sequence[np.ndarray]):
    self.parts = list(parts)
    self._ends = np.cumsum([len(part) for part in self.parts])
    self.shape = (int(self._ends[-1]),) + tuple(self.parts[0].shape[1:])
    self.dtype = self.parts[0].dtype

  def __len__(self):
    return self.shape[0]

  def __getitem__(self, index):
    if isinstance(index, slice) and index.step in (None, 1):
      return self._rows(*index.indices(self.shape[0])[:2])
    if not isinstance(index, (int, np.integer)):
      return np.asarray(self)[index]
    index = int(index) + (self.shape[0] if index < 0 else 0)
    if not 0 <= index < self.shape[0]:
      raise IndexError(f'index {index} out of range for {self.shape[0]} images')
    part = int(np.searchsorted(self._ends, index, side='right'))
    start = int(self._ends[part - 1]) if part else 0
    return self.parts[part][index - start]

  def _rows(self, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) copied out of only the parts they lie in."""
    pieces = []
    for part, end in zip(self.parts, self._ends):
      begin = end - len(part)
      low, high = max(start, begin), min(stop, end)
      if low < high:
        pieces.append(part[low - begin:high - begin])
    if not pieces:
      return np.zeros((0,) + self.shape[1:], self.dtype)
    return np.concatenate(pieces)

  def __array__(self, dtype=None, copy=None):
    del copy  # A concatenation is always a copy.
    array = np.concatenate(self.parts)
    return array if dtype is None else array.astype(dtype)


# ----------------------------------------------------------------------------------------------
# Transforms.


class GaussianBlur:
  """Gaussian blur with sigma ~ U(sigma_min, sigma_max), as MoCo v2 / PCL (PIL radius = sigma)."""

  def __init__(self, sigma: Sequence[float] = (0.1, 2.0)):
    self.sigma = sigma

  def __call__(self, image):
    sigma = random.uniform(self.sigma[0], self.sigma[1])
    return image.filter(ImageFilter.GaussianBlur(radius=sigma))


def _uint8_pixels(image) -> torch.Tensor:
  return torch.from_numpy(np.array(image, dtype=np.uint8, copy=True))


class ToNormalizedHWC:
  """PIL RGB -> float32 HWC tensor, ImageNet-normalised: ToTensor + Normalize, without the CHW
  round trip (one fused pass; 2x cheaper than ToTensor/Normalize/permute at 84 px)."""

  def __init__(self):
    self.offset = torch.tensor(MEAN, dtype=torch.float32) * 255.0
    self.scale = 1.0 / (torch.tensor(STD, dtype=torch.float32) * 255.0)

  def __call__(self, image):
    return _uint8_pixels(image).float().sub_(self.offset).mul_(self.scale)


class ToUint8HWC:
  """PIL RGB -> uint8 HWC tensor: the end of the training augmentations. Normalisation happens
  on the device (`device_transforms.normalize`, equal to `ToNormalizedHWC`), so workers and
  host-to-device copies move a quarter of float32's bytes (loader alone: +16% img/s here)."""

  def __call__(self, image):
    return _uint8_pixels(image)


# One view's augmentation under `data.augment_on_device`, as float32 values in this order:
# RandomResizedCrop's box in the cached image (top, left, height, width); whether the flip, the
# colour jitter (always in MoCo v1, p=0.8 in v2), grayscale and blur (v2, p=0.5) fired;
# ColorJitter's op order (fn_idx: 0 brightness, 1 contrast, 2 saturation, 3 hue), its three
# blend factors and the hue byte shift int32(hue * 255) mod 256; the blur's Pillow box-blur
# line weights (integer radius and the 24-bit weights of the inner and the two far taps,
# `pillow_box_blur`). `pcl_jax.device_augment` applies them.
AUGMENT_PARAMS = ('top', 'left', 'height', 'width', 'flip', 'jitter', 'grayscale', 'blur', 'op_0',
                  'op_1', 'op_2', 'op_3', 'brightness', 'contrast', 'saturation', 'hue_shift',
                  'blur_radius', 'blur_inner', 'blur_far')
BLUR_PASSES = 3  # Pillow's GaussianBlur: three box blurs a direction
BLUR_SIGMA = (0.1, 2.0)  # MoCo v2's blur: sigma ~ U(0.1, 2.0)


def hue_shift(hue_factor: float) -> int:
  """The hue byte shift of torchvision's PIL `adjust_hue`: int32(hue_factor * 255) mod 256."""
  return int(np.int32(hue_factor * 255).astype(np.uint8))


def pillow_box_blur(sigma: float) -> Tuple[int, int, int]:
  """(integer radius r, inner weight, far weight) of the box blur by which Pillow's
  `ImageFilter.GaussianBlur(sigma)` approximates a Gaussian (BoxBlur.c, three passes a
  direction): each pass maps a line to (inner * sum of the 2r + 1 nearest pixels + far * the
  two next ones + 2^23) >> 24, edges repeated. Computed with Pillow's float and double steps
  (_gaussian_blur_radius, ImagingHorizontalBoxBlur)."""
  f32 = np.float32
  radius = f32(sigma)  # the C float Pillow parses
  variance = f32(radius * radius) / f32(BLUR_PASSES)
  length = f32(np.sqrt(12.0 * np.float64(variance) + 1.0))
  whole = f32(np.floor((np.float64(length) - 1.0) / 2.0))
  fraction = (f32(2) * whole + f32(1)) * (whole * (whole + f32(1)) - f32(3) * variance)
  fraction = fraction / (f32(6) * (variance - (whole + f32(1)) * (whole + f32(1))))
  box_radius = f32(whole + fraction)
  inner = int(f32(1 << 24) / (box_radius * f32(2) + f32(1)))
  integer_radius = int(box_radius)
  return integer_radius, inner, ((1 << 24) - (2 * integer_radius + 1) * inner) // 2


class AugmentationDraws:
  """One view's random choices under `data.augment_on_device`, without applying them.

  Calls torch's generator (and, for the blur's sigma, Python's `random`) exactly as
  `train_transform(size, aug_plus)` does, in the same order and only when it does (RandomApply
  draws its coin first, and the wrapped op's draws only when the coin says so), so a seeded
  view gets the very crop, flip, colours and blur that the PIL path would give it. Returns
  float32 [len(AUGMENT_PARAMS)].
  """

  def __init__(self, image_size: int, aug_plus: bool):
    recipe = train_transform(image_size, aug_plus).transforms
    self.aug_plus = aug_plus
    self.crop, self.flip = recipe[0], recipe[-2]
    if aug_plus:  # crop, RandomApply(jitter), grayscale, RandomApply(blur), flip, to uint8
      self.jitter_apply, self.grayscale, self.blur_apply = recipe[1], recipe[2], recipe[3]
      self.jitter, self.blur = recipe[1].transforms[0], recipe[3].transforms[0]
    else:  # crop, grayscale, jitter, flip, to uint8
      self.grayscale, self.jitter = recipe[1], recipe[2]

  def _jitter_draws(self):
    order, brightness, contrast, saturation, hue = self.jitter.get_params(
        self.jitter.brightness, self.jitter.contrast, self.jitter.saturation, self.jitter.hue)
    return [int(op) for op in order] + [brightness, contrast, saturation, hue_shift(hue)]

  def __call__(self, image) -> torch.Tensor:
    box = list(self.crop.get_params(image, self.crop.scale, self.crop.ratio))
    jitter, blur = [0] * 8, [0] * 3  # for ops that did not fire (their draws never happen)
    if self.aug_plus:
      jittered = bool(torch.rand(1) <= self.jitter_apply.p)  # RandomApply: p < u skips
      if jittered:
        jitter = self._jitter_draws()
      grayscale = bool(torch.rand(1) < self.grayscale.p)
      blurred = bool(torch.rand(1) <= self.blur_apply.p)
      if blurred:
        blur = list(pillow_box_blur(random.uniform(*self.blur.sigma)))
    else:
      jittered, blurred = True, False
      grayscale = bool(torch.rand(1) < self.grayscale.p)
      jitter = self._jitter_draws()
    flip = bool(torch.rand(1) < self.flip.p)
    values = box + [flip, jittered, grayscale, blurred] + jitter + blur
    return torch.tensor([float(value) for value in values], dtype=torch.float32)


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


def eval_resize_size(image_size: int) -> int:
  """The eval transform's resize (short side) before the center crop: 8/7 of the crop."""
  return int(round(image_size * 8 / 7))


def train_transform(image_size: int, aug_plus: bool) -> Callable:
  """The reference's augmentation: MoCo v2 when aug_plus else MoCo v1 (salesforce/PCL).

  The PIL implementations are kept: on 84 px images they are faster than
  torchvision.transforms.v2 on uint8 tensors (0.74 vs 1.23 ms a view, measured here), and they
  are the reference's own ops, so the distribution is exactly the reference's. Views end as
  uint8 HWC; the jitted step normalises them (ToNormalizedHWC's arithmetic, on the device).
  `data.augment_on_device` replaces this with `AugmentationDraws` (the same draws).
  """
  if aug_plus:
    augment = [
        transforms.RandomResizedCrop(image_size, scale=(0.2, 1.0)),
        transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        transforms.RandomGrayscale(p=0.2),
        transforms.RandomApply([GaussianBlur(BLUR_SIGMA)], p=0.5),
        transforms.RandomHorizontalFlip(),
    ]
  else:
    augment = [
        transforms.RandomResizedCrop(image_size, scale=(0.2, 1.0)),
        transforms.RandomGrayscale(p=0.2),
        transforms.ColorJitter(0.4, 0.4, 0.4, 0.4),
        transforms.RandomHorizontalFlip(),
    ]
  return transforms.Compose(augment + [ToUint8HWC()])


def eval_transform(image_size: int) -> Callable:
  """Resize to 8/7 of the crop, then center-crop (no augmentation)."""
  return transforms.Compose([
      transforms.Resize(eval_resize_size(image_size)),
      transforms.CenterCrop(image_size),
      ToNormalizedHWC(),
  ])


# ----------------------------------------------------------------------------------------------
# Datasets and loaders.


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

  `image_size` is set when `transform` is `eval_transform(image_size)` (see `eval_dataset`):
  the feature pass then runs that transform on the device from uint8 rows of the cache
  (`eval_image_batches`, `pcl_jax.device_transforms`) instead of through loader workers.
  """

  def __init__(self, source, transform, image_size: Optional[int] = None):
    self.source, self.transform, self.image_size = source, transform, image_size

  def __len__(self):
    return len(self.source)

  def __getitem__(self, index):
    return self.transform(self.source.image(index)), int(self.source.labels[index]), index


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
  generator = torch.Generator().manual_seed(base_seed)
  order = torch.randperm(len(dataset), generator=generator).tolist()
  batches = _ProcessSliceBatches(order, batch_size, process_index, process_count,
                                 pad_to_full=False)
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


# ----------------------------------------------------------------------------------------------
# Split names.


def _split_names(split: str, setting: str = 'data split') -> list:
  names = [name.strip() for name in str(split).split('+') if name.strip()]
  if not names:
    raise UserError(f'{setting}={split!r} is empty; use e.g. train, or train+val+test')
  return names


def _unknown_split(name: str, available: Sequence[str], where: str, setting: str) -> UserError:
  return UserError(f'{setting}: split {name!r} does not exist in {where}; available: '
                   f'{", ".join(available) or "none"} (join several with +, e.g. '
                   f'{"+".join(available[:3]) or "train+val"})')


def _concat(sources: Sequence[ArraySource], name: str) -> ArraySource:
  if len(sources) == 1:
    return dataclasses.replace(sources[0], name=name)
  images = [s.images for s in sources]
  if all(isinstance(part, np.memmap) for part in images):
    joined = ConcatenatedImages(images)  # keep the caches on disk, shared by every worker
  else:
    joined = np.concatenate([np.asarray(part) for part in images])
  return ArraySource(joined, np.concatenate([s.labels for s in sources]), name,
                     sources[0].class_names)


# ----------------------------------------------------------------------------------------------
# Embedded sources: digits and fake.


def digits_source(split: str, image_size: int, setting: str = 'data split') -> ArraySource:
  """sklearn's bundled 8x8 digits, upscaled to `image_size`, split 60/20/20 per class (seeded)."""
  from sklearn import datasets as sk_datasets  # pylint: disable=g-import-not-at-top
  digits = sk_datasets.load_digits()
  pixels = np.clip(digits.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
  labels = digits.target.astype(np.int64)
  order = np.random.default_rng(0).permutation(len(labels))
  parts = {'train': [], 'val': [], 'test': []}
  for label in np.unique(labels):
    members = order[labels[order] == label]
    cut1, cut2 = int(0.6 * len(members)), int(0.8 * len(members))
    parts['train'] += list(members[:cut1])
    parts['val'] += list(members[cut1:cut2])
    parts['test'] += list(members[cut2:])
  sources = []
  for name in _split_names(split, setting):
    if name not in parts:
      raise _unknown_split(name, list(parts), 'data.name=digits', setting)
    index = np.sort(np.asarray(parts[name]))
    upscaled = np.stack([
        np.asarray(Image.fromarray(pixels[i]).resize((image_size, image_size),
                                                     Image.BILINEAR).convert('RGB'))
        for i in index])
    sources.append(ArraySource(upscaled, labels[index], f'digits/{name}',
                               tuple(str(d) for d in range(10))))
  return _concat(sources, f'digits/{split}')


def fake_source(split: str, image_size: int, size: int, num_classes: int,
                setting: str = 'data split') -> ArraySource:
  """torchvision FakeData (random images), decoded once; each split has its own images."""
  from torchvision import datasets as tv_datasets  # pylint: disable=g-import-not-at-top
  sources = []
  for offset, name in enumerate(_split_names(split, setting)):
    fake = tv_datasets.FakeData(size=size, image_size=(3, image_size, image_size),
                                num_classes=num_classes, random_offset=1000 * size * (offset + 1))
    images, labels = zip(*[(np.asarray(img.convert('RGB')), int(lbl)) for img, lbl in fake])
    sources.append(ArraySource(np.stack(images), np.asarray(labels, np.int64), f'fake/{name}',
                               tuple(str(c) for c in range(num_classes))))
  return _concat(sources, f'fake/{split}')


# ----------------------------------------------------------------------------------------------
# Image files: mini-ImageNet (CSV or folder layout) and ImageFolder trees.


@dataclasses.dataclass(frozen=True)
class SplitFiles:
  """The image files of one split, in dataset-index order."""
  split: str
  paths: Tuple[str, ...]  # absolute paths
  labels: np.ndarray  # [N] int64, indices into `class_names`
  class_names: Tuple[str, ...]  # sorted over the union of every split of the dataset
  fingerprint: str  # sha256 of (relative path, class, byte size) of every file, in order
  where: str  # the directory or CSV the files come from (for messages)


def _is_image(name: str) -> bool:
  return not name.startswith('.') and name.lower().endswith(IMAGE_EXTENSIONS)


def _subdirs(path: str) -> List[str]:
  """Sorted non-hidden subdirectory names (hidden ones hold e.g. our own .cache)."""
  with os.scandir(path) as entries:
    return sorted(e.name for e in entries if not e.name.startswith('.') and e.is_dir())


def _holds_images(path: str) -> bool:
  with os.scandir(path) as entries:
    return any(_is_image(e.name) and e.is_file() for e in entries)


def _check_root(data_config) -> str:
  if not data_config.root:
    raise UserError(f'data.name={data_config.name} needs data.root=DIR (see README "Data '
                    'layout")')
  root = os.path.abspath(os.path.expanduser(str(data_config.root)))
  if not os.path.isdir(root):
    raise UserError(f'data.root={data_config.root} does not exist (or is not a directory); set '
                    'data.root to the dataset directory (see README "Data layout")')
  try:
    with os.scandir(root) as entries:
      empty = not any(not e.name.startswith('.') for e in entries)
  except OSError as error:
    raise UserError(f'cannot read data.root={data_config.root} ({error}); fix its permissions or '
                    'point data.root at a readable copy') from error
  if empty:
    raise UserError(f'data.root={data_config.root} is empty; put the dataset there or point '
                    'data.root at it (see README "Data layout")')
  return root


def _folder_splits(root: str) -> Dict[str, str]:
  """{split: directory} of an ImageFolder tree; a root holding class folders is split 'all'."""
  subdirs = _subdirs(root)
  if any(_holds_images(os.path.join(root, name)) for name in subdirs):
    return {'all': root}
  return {name: os.path.join(root, name) for name in subdirs
          if _subdirs(os.path.join(root, name))}


def _csv_header(path: str) -> str:
  with open(path, newline='', encoding='utf-8-sig') as csv_file:
    return csv_file.readline().strip().replace(' ', '')


def _csv_splits(root: str) -> Dict[str, str]:
  """{split: CSV path} of the Ravi & Larochelle layout (CSVs with a `filename,label` header)."""
  if not os.path.isdir(os.path.join(root, 'images')):
    return {}
  with os.scandir(root) as entries:
    csvs = sorted(e.name for e in entries if e.name.endswith('.csv') and e.is_file())
  return {name[:-4]: os.path.join(root, name) for name in csvs
          if _csv_header(os.path.join(root, name)) == 'filename,label'}


def _read_csv(path: str) -> List[Tuple[str, str]]:
  """(filename, label) rows of one split CSV; a malformed row is a UserError naming its line."""
  import csv  # pylint: disable=g-import-not-at-top
  rows = []
  with open(path, newline='', encoding='utf-8-sig') as csv_file:
    for line_number, row in enumerate(csv.reader(csv_file), start=1):
      if line_number == 1 or not row or not ''.join(row).strip():
        continue
      if len(row) != 2 or not row[0].strip() or not row[1].strip():
        raise UserError(f'{path}, line {line_number}: expected "filename,label", got {row!r}; '
                        'fix the split CSV (see third_party/README.md for the originals)')
      rows.append((row[0].strip(), row[1].strip()))
  return rows


@dataclasses.dataclass(frozen=True)
class _Layout:
  kind: str  # 'csv' | 'folder'
  root: str
  splits: Dict[str, str]  # split -> CSV path or directory
  class_names: Tuple[str, ...]


def _layout(data_config) -> _Layout:
  """Finds the dataset's splits and its class names (sorted over the union of all splits)."""
  root = _check_root(data_config)
  name = data_config.name
  csv_splits = _csv_splits(root) if name == 'mini_imagenet' else {}
  if csv_splits:
    classes = set()
    for path in csv_splits.values():
      classes.update(label for _, label in _read_csv(path))
    return _Layout('csv', root, csv_splits, tuple(sorted(classes)))
  splits = _folder_splits(root)
  if name == 'mini_imagenet' and (not splits or 'all' in splits):
    hint = ''
    if os.path.isdir(os.path.join(root, 'images')):
      hint = (f' {root}/images exists but no CSV with a "filename,label" header sits next to '
              'it: add train.csv, val.csv, test.csv (third_party/README.md says where from).')
    raise UserError(
        f'data.root={data_config.root} is not a mini-ImageNet directory.{hint} Expected either '
        'DIR/images/*.jpg with DIR/train.csv, val.csv, test.csv (Ravi & Larochelle split) or '
        'DIR/train/<wnid>/*.jpg, DIR/val/..., DIR/test/... (see README "Data layout")')
  if not splits:
    raise UserError(f'data.root={data_config.root} holds no class folders; expected '
                    'DIR/<split>/<class>/<image> or DIR/<class>/<image> (see README "Data '
                    'layout")')
  classes = set()
  for directory in splits.values():
    classes.update(_subdirs(directory))
  return _Layout('folder', root, splits, tuple(sorted(classes)))


def _fingerprint(entries: Sequence[Tuple[str, str, int]]) -> str:
  digest = hashlib.sha256()
  for relative, class_name, size in entries:
    digest.update(f'{relative}\t{class_name}\t{size}\n'.encode())
  return digest.hexdigest()


def _csv_split_files(layout: _Layout, split: str) -> SplitFiles:
  csv_path = layout.splits[split]
  images_dir = os.path.join(layout.root, 'images')
  with os.scandir(images_dir) as entries:
    sizes = {e.name: e.stat().st_size for e in entries if e.is_file()}
  rows = _read_csv(csv_path)
  if not rows:
    raise UserError(f'{csv_path} lists no images; restore the split CSV (third_party/README.md)')
  missing = [filename for filename, _ in rows if filename not in sizes]
  if missing:
    raise UserError(f'{csv_path} names {len(missing)} file(s) absent from {images_dir}, e.g. '
                    f'{", ".join(missing[:3])}; restore the images or use the CSVs that match '
                    'them (data.root)')
  label_of = {name: label for label, name in enumerate(layout.class_names)}
  entries = [(f'images/{filename}', class_name, sizes[filename]) for filename, class_name in rows]
  return SplitFiles(split, tuple(os.path.join(images_dir, filename) for filename, _ in rows),
                    np.asarray([label_of[c] for _, c in rows], np.int64), layout.class_names,
                    _fingerprint(entries), csv_path)


def _folder_split_files(layout: _Layout, split: str) -> SplitFiles:
  """The files of one ImageFolder split, in torchvision ImageFolder order."""
  directory = layout.splits[split]
  label_of = {name: label for label, name in enumerate(layout.class_names)}
  paths, labels, entries, empty = [], [], [], []
  for class_name in _subdirs(directory):
    count = len(paths)
    for walk_root, _, filenames in sorted(os.walk(os.path.join(directory, class_name),
                                                  followlinks=True)):
      for filename in sorted(filenames):
        if _is_image(filename):
          path = os.path.join(walk_root, filename)
          paths.append(path)
          labels.append(label_of[class_name])
          entries.append((os.path.relpath(path, layout.root), class_name,
                          os.stat(path).st_size))
    if len(paths) == count:
      empty.append(class_name)
  if not paths:
    raise UserError(f'split {split!r} of data.root={layout.root} holds no images (looked for '
                    f'{directory}/<class>/*{{{",".join(IMAGE_EXTENSIONS)}}}); put the images '
                    'there or fix data.root')
  if empty:
    logging.warning('split %r: class folder(s) without images: %s', split, ', '.join(empty[:5]))
  return SplitFiles(split, tuple(paths), np.asarray(labels, np.int64), layout.class_names,
                    _fingerprint(entries), directory)


def list_split_files(data_config, split: str, setting: str = 'data split') -> List[SplitFiles]:
  """The image files of every split named in `split` ('+'-joined), validated; no decoding."""
  layout = _layout(data_config)
  logging.info('%s: %s layout in %s, splits %s', data_config.name, layout.kind, layout.root,
               ', '.join(sorted(layout.splits)))
  result = []
  for name in _split_names(split, setting):
    if name not in layout.splits:
      where = f'data.root={data_config.root}'
      if layout.splits.keys() == {'all'}:
        raise UserError(f'{setting}={split!r}: data.root={data_config.root} holds class folders '
                        "directly, so it is one split named 'all': set the split to all (an "
                        'eval on it sees the training images), or arrange DIR/train/<class>/ and '
                        'DIR/test/<class>/')
      csv_path = os.path.join(layout.root, f'{name}.csv')
      if layout.kind == 'csv' and os.path.isfile(csv_path):
        raise UserError(f'{setting}={split!r}: {csv_path} does not start with the header '
                        '"filename,label"; fix its first line (third_party/README.md)')
      raise _unknown_split(name, sorted(layout.splits), where, setting)
    if layout.kind == 'csv':
      result.append(_csv_split_files(layout, name))
    else:
      result.append(_folder_split_files(layout, name))
  return result


# ----------------------------------------------------------------------------------------------
# The decoded-image cache.


def cache_image_size(data_config) -> int:
  """Side S of the cached [N, S, S, 3] images.

  `data.cache_size` when set (> 0); else 84 for mini-ImageNet (its native resolution); else the
  eval transform's resize size, so eval needs no further resize and training crops are taken at
  the resolution the network sees.
  """
  size = int(data_config.get('cache_size', 0) or 0)
  if size > 0:
    return size
  if data_config.name == 'mini_imagenet':
    return MINI_IMAGENET_SIZE
  return eval_resize_size(data_config.image_size)


def _resize_mode(dataset_name: str) -> str:
  # mini-ImageNet's standard preprocessing squashes every image to 84x84 (Lanczos); other
  # folders keep the aspect ratio like torchvision's Resize + CenterCrop.
  return 'squash' if dataset_name == 'mini_imagenet' else 'short_side_center_crop'


def _decode_image(path: str, size: int, mode: str) -> np.ndarray:
  """One file -> uint8 [size, size, 3]. Raises whatever PIL raises on a bad file."""
  with Image.open(path) as image:
    image = image.convert('RGB')
  if mode == 'squash':
    if image.size != (size, size):
      image = image.resize((size, size), Image.LANCZOS)
  else:
    image = tv_functional.center_crop(tv_functional.resize(image, size), size)
  return np.asarray(image)


def _decode_rows(images: np.ndarray, paths: Sequence[str], start: int, stop: int, size: int,
                 mode: str) -> List[Tuple[str, str]]:
  """Decodes paths[start:stop] into rows of `images`; returns (path, error) of bad files."""
  failures = []
  for row in range(start, stop):
    try:
      images[row] = _decode_image(paths[row], size, mode)
    except Exception as error:  # pylint: disable=broad-except
      # Any failure is the file's fault (unreadable, truncated, not an image): report it by name.
      failures.append((paths[row], f'{type(error).__name__}: {error}'))
  return failures


def _cache_paths(data_config, root: str, split: str, size: int, mode: str) -> Tuple[str, str]:
  safe_split = re.sub(r'[^A-Za-z0-9_.-]', '_', split)
  stem = f'{data_config.name}-{safe_split}-{size}px-{mode}'
  if data_config.cache_dir:
    # A shared cache directory holds several datasets: key the name by the dataset root too.
    directory = os.path.abspath(os.path.expanduser(str(data_config.cache_dir)))
    stem += '-' + hashlib.sha256(root.encode()).hexdigest()[:10]
  else:
    directory = os.path.join(root, '.cache')
  return os.path.join(directory, stem + '.npy'), os.path.join(directory, stem + '.json')


def _expected_manifest(data_config, files: SplitFiles, size: int, mode: str) -> dict:
  return {'format': CACHE_FORMAT, 'dataset': data_config.name, 'split': files.split,
          'num_images': len(files.paths), 'files_sha256': files.fingerprint,
          'image_size': size, 'resize': mode, 'shape': [len(files.paths), size, size, 3]}


_CHECKED_FIELDS = ('format', 'num_images', 'files_sha256', 'image_size', 'resize', 'shape')


def _load_valid_cache(npy_path: str, manifest_path: str, expected: dict):
  """The memory-mapped cache if its manifest matches `expected`, else (None, reason)."""
  if not os.path.exists(manifest_path) or not os.path.exists(npy_path):
    return None, 'no cache yet'
  try:
    with open(manifest_path) as manifest_file:
      manifest = json.load(manifest_file)
  except (OSError, ValueError):
    return None, 'unreadable manifest'
  changed = [field for field in _CHECKED_FIELDS if manifest.get(field) != expected[field]]
  if changed:
    return None, f'dataset or settings changed ({", ".join(changed)})'
  if os.path.getsize(npy_path) != manifest.get('npy_bytes'):
    return None, 'cache file has the wrong size'
  try:
    images = np.load(npy_path, mmap_mode='r')
  except (OSError, ValueError):
    return None, 'unreadable cache file'
  if list(images.shape) != expected['shape'] or images.dtype != np.uint8:
    return None, 'cache file has the wrong shape'
  return images, ''


def _write_json_atomic(path: str, payload: dict) -> None:
  temporary = f'{path}.tmp-{socket.gethostname()}-{os.getpid()}'
  with open(temporary, 'w') as json_file:
    json.dump(payload, json_file, indent=1)
    json_file.flush()
    os.fsync(json_file.fileno())
  os.replace(temporary, path)


def _remove_stale_temporaries(npy_path: str) -> None:
  """Deletes temp files of killed builds on this host (a live build keeps its own)."""
  directory, base = os.path.split(npy_path)
  prefix = f'{base}.tmp-{socket.gethostname()}-'
  for name in os.listdir(directory):
    if not name.startswith(prefix):
      continue
    try:
      pid = int(name[len(prefix):])
      os.kill(pid, 0)
    except ValueError:
      continue
    except ProcessLookupError:
      os.remove(os.path.join(directory, name))
    except PermissionError:
      pass  # alive, owned by someone else


def _decode_threads() -> int:
  # PIL releases the GIL while decoding and resizing, so threads scale with cores.
  try:
    cores = len(os.sched_getaffinity(0))
  except AttributeError:
    cores = os.cpu_count() or 1
  return max(1, min(16, cores))


def _build_cache(files: SplitFiles, npy_path: str, manifest_path: str, expected: dict,
                 setting_hint: str) -> None:
  """Decodes every file of `files` into a new cache; atomic (temp file + rename)."""
  num, size = expected['num_images'], expected['image_size']
  directory = os.path.dirname(npy_path)
  try:
    os.makedirs(directory, exist_ok=True)
    _remove_stale_temporaries(npy_path)
    free = shutil.disk_usage(directory).free
  except OSError as error:
    raise UserError(f'cannot write the decoded-image cache in {directory} ({error}); set '
                    'data.cache_dir to a writable directory') from error
  needed = num * size * size * 3
  if needed > free:
    raise UserError(f'the decoded-image cache of {files.split!r} needs {needed / 2**30:.2f} GiB '
                    f'but {directory} has {free / 2**30:.2f} GiB free; set data.cache_dir to a '
                    'larger disk')
  temporary = f'{npy_path}.tmp-{socket.gethostname()}-{os.getpid()}'
  start = time.perf_counter()
  images = np.lib.format.open_memmap(temporary, mode='w+', dtype=np.uint8,
                                     shape=(num, size, size, 3))
  failures = []
  executor = concurrent.futures.ThreadPoolExecutor(_decode_threads())
  try:
    chunk = 128
    futures = {executor.submit(_decode_rows, images, files.paths, first,
                               min(first + chunk, num), size, expected['resize']):
                   min(first + chunk, num) - first
               for first in range(0, num, chunk)}
    with tqdm.tqdm(total=num, desc=f'decoding {expected["dataset"]}/{files.split} once',
                   unit='img', dynamic_ncols=True) as progress:
      for future in concurrent.futures.as_completed(futures):
        failures.extend(future.result())
        progress.update(futures[future])
    images.flush()
    del images
    if failures:
      failures.sort()
      shown = '; '.join(f'{path}: {error}' for path, error in failures[:3])
      more = f' (and {len(failures) - 3} more)' if len(failures) > 3 else ''
      raise UserError(f'cannot decode {len(failures)} image(s) of {setting_hint} split '
                      f'{files.split!r}: {shown}{more}. Replace or delete the file(s) (and drop '
                      'them from the split CSV), then rerun')
    os.replace(temporary, npy_path)
  except BaseException:
    executor.shutdown(wait=True, cancel_futures=True)
    if os.path.exists(temporary):
      os.remove(temporary)
    raise
  executor.shutdown(wait=True)
  # The manifest is written last: it is what marks the cache as complete.
  _write_json_atomic(manifest_path, {**expected, 'npy_bytes': os.path.getsize(npy_path),
                                     'source': files.where,
                                     'built': time.strftime('%Y-%m-%dT%H:%M:%S')})
  logging.info('decoded %d images of %s into %s in %.1fs', num, files.split, npy_path,
               time.perf_counter() - start)


def cached_images(data_config, files: SplitFiles) -> np.ndarray:
  """The split's decoded images as a read-only memory-mapped uint8 [N, S, S, 3] array.

  Built on first use (and whenever the file list, a file size or the image size changes), under
  data.cache_dir, or DIR/.cache when that is ''.
  """
  root = os.path.abspath(os.path.expanduser(str(data_config.root)))
  size, mode = cache_image_size(data_config), _resize_mode(data_config.name)
  npy_path, manifest_path = _cache_paths(data_config, root, files.split, size, mode)
  expected = _expected_manifest(data_config, files, size, mode)
  images, reason = _load_valid_cache(npy_path, manifest_path, expected)
  if images is not None:
    return images
  logging.info('building the decoded-image cache %s (%s)', npy_path, reason)
  _build_cache(files, npy_path, manifest_path, expected, f'data.root={data_config.root}')
  images, reason = _load_valid_cache(npy_path, manifest_path, expected)
  if images is None:  # e.g. a concurrent build replaced it with a different dataset version
    raise UserError(f'the decoded-image cache {npy_path} was changed while it was built '
                    f'({reason}); rerun, with one run building it at a time')
  return images


def _warn_if_not_standard(data_config, files: SplitFiles) -> None:
  standard = MINI_IMAGENET_SPLITS.get(files.split)
  if data_config.name != 'mini_imagenet' or standard is None:
    return
  found = (len(np.unique(files.labels)), len(files.paths))
  if found != standard:
    logging.warning('mini-ImageNet split %r has %d classes and %d images; the standard '
                    '(Ravi & Larochelle) one has %d and %d: results will not be comparable with '
                    'published ones', files.split, found[0], found[1], *standard)


def folder_source(data_config, split: str, setting: str = 'data split') -> ArraySource:
  """mini-ImageNet or ImageFolder split(s) served from the decoded-image cache."""
  sources = []
  for files in list_split_files(data_config, split, setting):
    _warn_if_not_standard(data_config, files)
    sources.append(ArraySource(cached_images(data_config, files), files.labels,
                               f'{data_config.name}/{files.split}', files.class_names))
  return _concat(sources, f'{data_config.name}/{split}')


def load_source(data_config, split: str, *, setting: str = 'data split') -> ArraySource:
  """The image source named by `data.name` for one split (or '+'-joined splits).

  Args:
    data_config: the `data` section of the config.
    split: split name(s), e.g. 'train' or 'train+val+test'.
    setting: the config field `split` came from, for error messages.
  Raises:
    UserError: unknown dataset or split, missing/empty root, bad CSV, undecodable image.
  """
  name = data_config.name
  if name == 'digits':
    return digits_source(split, max(data_config.image_size, 8), setting)
  if name == 'fake':
    return fake_source(split, data_config.image_size, data_config.fake_size,
                       data_config.fake_classes, setting)
  if name in ('image_folder', 'mini_imagenet'):
    return folder_source(data_config, split, setting)
  raise UserError(f'data.name={name!r} is unknown; use one of {", ".join(DATASETS)}')


# ----------------------------------------------------------------------------------------------
# What a run builds.


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
  logging.info('pretraining on %s (data.train_split=%r): %d images, %d classes', source.name,
               data.train_split, len(source), len(np.unique(source.labels)))
  if data.name != 'mini_imagenet':
    return
  if _split_names(data.train_split) == ['train']:
    logging.info('mini-ImageNet: pretraining on the train classes only, so few-shot numbers '
                 'on %r are comparable with published ones', data.eval_split)
  else:
    logging.warning('mini-ImageNet: data.train_split=%r pretrains on the val/test classes too '
                    '(as the research notes did); few-shot numbers are only comparable with '
                    'published ones when pretraining on train', data.train_split)


def build_train_datasets(config) -> Datasets:
  """Training pairs and their index-aligned eval view, from `config.data`."""
  source = load_source(config.data, config.data.train_split, setting='data.train_split')
  check_split_fits_batch(len(source), config.train.batch_size, config.data.train_split)
  _log_pretraining_split(config, source)
  if config.data.augment_on_device:
    train = DrawsOnlyDataset(source, AugmentationDraws(config.data.image_size,
                                                       config.data.aug_plus))
  else:
    train = TwoCropDataset(source, train_transform(config.data.image_size, config.data.aug_plus))
  return Datasets(train=train,
                  train_eval=eval_dataset(source, config.data.image_size),
                  num_train=len(source))


def build_eval_dataset(config, split: Optional[str] = None) -> EvalDataset:
  """Eval-transform dataset of `split` (default `data.eval_split`)."""
  setting = 'data.eval_split' if split is None else 'data split'
  source = load_source(config.data, split or config.data.eval_split, setting=setting)
  return eval_dataset(source, config.data.image_size)


def eval_dataset(source: ArraySource, image_size: int) -> EvalDataset:
  """`source` under the standard eval transform (which the feature pass runs on the device)."""
  return EvalDataset(source, eval_transform(image_size), image_size=image_size)
