"""Data: image sources, the two augmentation recipes, and torch DataLoaders yielding numpy.

This module owns everything between files on disk and a numpy batch: datasets, transforms,
samplers and collation. It never touches JAX arrays or model state. Training batches are dicts
`{'im_q', 'im_k': [B, H, W, 3] float32 NHWC, 'index': [B] int64}`; evaluation batches
`{'image', 'label', 'index'}`. Shuffling is seeded from (seed, epoch) so a resumed run replays
the same order and the same augmentations.
"""

import dataclasses
import random
from typing import Callable, Optional, Sequence

import numpy as np
from PIL import Image, ImageFilter
import torch
from torch.utils import data as torch_data
from torchvision import transforms

# ImageNet statistics, as the reference normalises every dataset with them.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
DATASETS = ('digits', 'fake', 'image_folder', 'mini_imagenet')


@dataclasses.dataclass(frozen=True)
class ArraySource:
  """Decoded images held in one uint8 array [N, H, W, 3] (in memory or memory-mapped)."""
  images: np.ndarray
  labels: np.ndarray
  name: str = ''

  def __len__(self):
    return len(self.labels)

  def image(self, index: int) -> Image.Image:
    return Image.fromarray(np.asarray(self.images[index]))


class GaussianBlur:
  """Gaussian blur with sigma ~ U(sigma_min, sigma_max), as MoCo v2 / PCL (PIL radius = sigma)."""

  def __init__(self, sigma: Sequence[float] = (0.1, 2.0)):
    self.sigma = sigma

  def __call__(self, image):
    sigma = random.uniform(self.sigma[0], self.sigma[1])
    return image.filter(ImageFilter.GaussianBlur(radius=sigma))


def _to_normalized_hwc():
  """ToTensor + ImageNet normalisation, then CHW -> HWC so batches are NHWC for Flax."""
  return transforms.Compose([
      transforms.ToTensor(),
      transforms.Normalize(MEAN, STD),
      transforms.Lambda(lambda t: t.permute(1, 2, 0)),
  ])


def train_transform(image_size: int, aug_plus: bool) -> Callable:
  """The reference's augmentation: MoCo v2 when aug_plus else MoCo v1."""
  if aug_plus:
    augment = [
        transforms.RandomResizedCrop(image_size, scale=(0.2, 1.0)),
        transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        transforms.RandomGrayscale(p=0.2),
        transforms.RandomApply([GaussianBlur((0.1, 2.0))], p=0.5),
        transforms.RandomHorizontalFlip(),
    ]
  else:
    augment = [
        transforms.RandomResizedCrop(image_size, scale=(0.2, 1.0)),
        transforms.RandomGrayscale(p=0.2),
        transforms.ColorJitter(0.4, 0.4, 0.4, 0.4),
        transforms.RandomHorizontalFlip(),
    ]
  return transforms.Compose(augment + [_to_normalized_hwc()])


def eval_transform(image_size: int) -> Callable:
  """Resize to 8/7 of the crop, then center-crop (no augmentation)."""
  return transforms.Compose([
      transforms.Resize(int(round(image_size * 8 / 7))),
      transforms.CenterCrop(image_size),
      _to_normalized_hwc(),
  ])


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
  """One deterministic view per image: (image, label, index), indices aligned with training."""

  def __init__(self, source, transform):
    self.source, self.transform = source, transform

  def __len__(self):
    return len(self.source)

  def __getitem__(self, index):
    return self.transform(self.source.image(index)), int(self.source.labels[index]), index


def _collate_train(samples):
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


def _seed_worker(worker_id):
  # torch seeds each worker from the loader's generator; python's `random` (GaussianBlur) follows.
  random.seed(torch.initial_seed() % 2**32)


def train_loader(dataset, batch_size: int, *, seed: int, epoch: int, num_workers: int):
  """Shuffled loader of one epoch; same (seed, epoch) -> same order and same augmentations."""
  generator = torch.Generator().manual_seed(epoch_seed(seed, epoch))
  # With num_workers=0 the transforms draw from the global RNGs of this process: seed them too.
  torch.manual_seed(epoch_seed(seed, epoch))
  random.seed(epoch_seed(seed, epoch))
  return torch_data.DataLoader(
      dataset, batch_size=batch_size, sampler=torch_data.RandomSampler(dataset,
                                                                        generator=generator),
      drop_last=True, num_workers=num_workers, collate_fn=_collate_train, generator=generator,
      worker_init_fn=_seed_worker, persistent_workers=False,
      prefetch_factor=4 if num_workers else None)


def eval_loader(dataset, batch_size: int, *, num_workers: int):
  """Sequential loader in dataset-index order, keeping the last partial batch."""
  return torch_data.DataLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=False,
                               num_workers=num_workers, collate_fn=_collate_eval,
                               prefetch_factor=4 if num_workers else None)


def numpy_batches(loader):
  """Yields the loader's batches as dicts of numpy arrays (zero-copy views of the tensors)."""
  for batch in loader:
    yield {name: value.numpy() for name, value in batch.items()}


# ----------------------------------------------------------------------------------------------
# Sources.


def _split_names(split: str) -> list:
  names = [name.strip() for name in split.split('+') if name.strip()]
  if not names:
    raise ValueError(f'empty split {split!r}; use e.g. data.train_split=train or train+val+test')
  return names


def _concat(sources: Sequence[ArraySource], name: str) -> ArraySource:
  if len(sources) == 1:
    return sources[0]
  return ArraySource(np.concatenate([s.images for s in sources]),
                     np.concatenate([s.labels for s in sources]), name)


def digits_source(split: str, image_size: int) -> ArraySource:
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
  for name in _split_names(split):
    if name not in parts:
      raise ValueError(f'data split {name!r} does not exist for digits; use train, val or test '
                       'joined with +')
    index = np.sort(np.asarray(parts[name]))
    upscaled = np.stack([
        np.asarray(Image.fromarray(pixels[i]).resize((image_size, image_size),
                                                     Image.BILINEAR).convert('RGB'))
        for i in index])
    sources.append(ArraySource(upscaled, labels[index], f'digits/{name}'))
  return _concat(sources, f'digits/{split}')


def fake_source(split: str, image_size: int, size: int, num_classes: int) -> ArraySource:
  """torchvision FakeData (random images), decoded once; each split has its own images."""
  from torchvision import datasets as tv_datasets  # pylint: disable=g-import-not-at-top
  sources = []
  for offset, name in enumerate(_split_names(split)):
    fake = tv_datasets.FakeData(size=size, image_size=(3, image_size, image_size),
                                num_classes=num_classes, random_offset=1000 * size * (offset + 1))
    images, labels = zip(*[(np.asarray(img.convert('RGB')), int(lbl)) for img, lbl in fake])
    sources.append(ArraySource(np.stack(images), np.asarray(labels, np.int64), f'fake/{name}'))
  return _concat(sources, f'fake/{split}')


def load_source(data_config, split: str):
  """The image source named by `data.name` for one split (or '+'-joined splits)."""
  name = data_config.name
  if name == 'digits':
    return digits_source(split, max(data_config.image_size, 8))
  if name == 'fake':
    return fake_source(split, data_config.image_size, data_config.fake_size,
                       data_config.fake_classes)
  if name in ('image_folder', 'mini_imagenet'):
    raise NotImplementedError(f'data.name={name} arrives with the data issue')
  raise ValueError(f'data.name={name!r} is unknown; use one of {", ".join(DATASETS)}')


@dataclasses.dataclass
class Datasets:
  """The three views of the data a run needs."""
  train: TwoCropDataset  # augmented pairs of the training split
  train_eval: EvalDataset  # the same images, eval transform, same indices (for the E-step)
  num_train: int


def build_train_datasets(config) -> Datasets:
  """Training pairs and their index-aligned eval view, from `config.data`."""
  source = load_source(config.data, config.data.train_split)
  return Datasets(train=TwoCropDataset(source, train_transform(config.data.image_size,
                                                               config.data.aug_plus)),
                  train_eval=EvalDataset(source, eval_transform(config.data.image_size)),
                  num_train=len(source))


def build_eval_dataset(config, split: Optional[str] = None) -> EvalDataset:
  """Eval-transform dataset of `split` (default `data.eval_split`)."""
  source = load_source(config.data, split or config.data.eval_split)
  return EvalDataset(source, eval_transform(config.data.image_size))
