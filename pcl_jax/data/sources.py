"""Image sources: which images (and labels) a split holds, decoded into one uint8 array.

This module owns finding the images of a split and serving them as an `ArraySource`: sklearn's
digits and torchvision's FakeData (embedded, decoded in memory), mini-ImageNet in its CSV or
folder layout and any torchvision ImageFolder tree (files listed and checked here, decoded once
by `cache`), and how large the stored images are (`stored_image_size`, which resolves
`data.eval_resize=auto`). It never transforms images.

Data layout (data.root = DIR):
- `mini_imagenet`, Ravi & Larochelle layout: `DIR/images/*.jpg` and `DIR/{train,val,test}.csv`
  (header `filename,label`); or the folder layout `DIR/{train,val,test}/<wnid>/*.jpg`. Images are
  cached at 84x84 (each image squashed to 84x84 with Lanczos, the standard mini-ImageNet
  preprocessing; a no-op for the usual 84x84 release).
- `image_folder`: `DIR/<split>/<class>/**/<image>`; a DIR that holds class folders directly is one
  split named `all`. Unlabelled images: a DIR that holds image files directly (no class
  folders), or with `data.labels=False` every image under DIR at any depth (folder names
  ignored), is one unlabelled split (`labels` None) that every split setting names (`train`,
  `test`, `all`, ...): the run trains and evaluates on the same images. Images are cached at the
  eval resize size (short side resized, bilinear, then center-cropped to a square), so training
  crops come from that central square: the crop size itself under `data.eval_resize` 'whole',
  8/7 of it under 'center'. With 'auto' a fixed sample of the files' headers decides
  (`stored_image_size`, `recipes.resolve_eval_resize`).
Splits join with '+' ('train+val+test'); labels are the indices of the sorted class names over
the union of every split of DIR, so a class has the same label in every split.
"""

import dataclasses
import hashlib
import logging
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from pcl_jax import configuration
from pcl_jax.configuration import UserError
from pcl_jax.data import cache
from pcl_jax.data import recipes

DATASETS = configuration.DATASETS
# torchvision's ImageFolder extensions (torchvision.datasets.folder.IMG_EXTENSIONS).
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')
# The name of the one split of unlabelled images (whatever the split settings call it).
UNLABELLED_SPLIT = 'all'
# (classes, images) of the standard Ravi & Larochelle split.
MINI_IMAGENET_SPLITS = {'train': (64, 38400), 'val': (16, 9600), 'test': (20, 12000)}


@dataclasses.dataclass(frozen=True)
class ArraySource:
  """Decoded images held in one uint8 array [N, H, W, 3] (in memory or memory-mapped).

  `images` may also be a `ConcatenatedImages` view (splits joined with '+'); `labels` is None
  for unlabelled images; `class_names[l]` is the name of label l when the source has named
  classes; `paths[i]` is image i's file (absolute) when the images are files, else `paths` is
  empty.
  """
  images: np.ndarray
  labels: Optional[np.ndarray]
  name: str = ''
  class_names: Tuple[str, ...] = ()
  paths: Tuple[str, ...] = ()

  def __len__(self):
    return len(self.images)

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
# Split names.


def split_names(split: str, setting: str = 'data split') -> list:
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
  labelled = all(s.labels is not None for s in sources)
  labels = np.concatenate([s.labels for s in sources]) if labelled else None
  paths = sum((s.paths for s in sources), ()) if all(s.paths for s in sources) else ()
  return ArraySource(joined, labels, name, sources[0].class_names, paths)


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
  for name in split_names(split, setting):
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
  for offset, name in enumerate(split_names(split, setting)):
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
  labels: Optional[np.ndarray]  # [N] int64, indices into `class_names`; None: unlabelled
  class_names: Tuple[str, ...]  # sorted over the union of every split of the dataset
  # (path relative to data.root, class ('' unlabelled), byte size, modification time in ns) of
  # every file, in order: what the decoded-image cache is checked against.
  entries: Tuple[Tuple[str, str, int, int], ...]
  where: str  # the directory or CSV the files come from (for messages)

  @property
  def fingerprint(self) -> str:
    """sha256 of `entries`: equal while no file is added, removed, resized or rewritten."""
    digest = hashlib.sha256()
    for entry in self.entries:
      digest.update('\t'.join(map(str, entry)).encode() + b'\n')
    return digest.hexdigest()


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
  kind: str  # 'csv' | 'folder' | 'flat' (image files in DIR) | 'tree' (data.labels=False)
  root: str
  splits: Dict[str, str]  # split -> CSV path or directory
  class_names: Tuple[str, ...]


def _layout(data_config) -> _Layout:
  """Finds the dataset's splits and its class names (sorted over the union of all splits)."""
  root = _check_root(data_config)
  name = data_config.name
  if name == 'image_folder' and not data_config.labels:
    return _Layout('tree', root, {UNLABELLED_SPLIT: root}, ())
  if name == 'image_folder' and _holds_images(root):
    if _subdirs(root):
      raise UserError(f'data.root={data_config.root} holds image files and folders, so it is '
                      'neither unlabelled images nor class folders: set data.labels=False to read '
                      'every image under it, folders ignored, or move the loose images into '
                      'class folders')
    return _Layout('flat', root, {UNLABELLED_SPLIT: root}, ())
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
    raise UserError(f'data.root={data_config.root} holds no class folders and no image files; '
                    'expected DIR/<split>/<class>/<image>, DIR/<class>/<image> or DIR/<image> '
                    '(unlabelled; data.labels=False reads images at any depth) (see README '
                    '"Data layout")')
  classes = set()
  for directory in splits.values():
    classes.update(_subdirs(directory))
  return _Layout('folder', root, splits, tuple(sorted(classes)))


def _csv_split_files(layout: _Layout, split: str) -> SplitFiles:
  csv_path = layout.splits[split]
  images_dir = os.path.join(layout.root, 'images')
  with os.scandir(images_dir) as entries:
    stats = {e.name: e.stat() for e in entries if e.is_file()}
  rows = _read_csv(csv_path)
  if not rows:
    raise UserError(f'{csv_path} lists no images; restore the split CSV (third_party/README.md)')
  missing = [filename for filename, _ in rows if filename not in stats]
  if missing:
    raise UserError(f'{csv_path} names {len(missing)} file(s) absent from {images_dir}, e.g. '
                    f'{", ".join(missing[:3])}; restore the images or use the CSVs that match '
                    'them (data.root)')
  label_of = {name: label for label, name in enumerate(layout.class_names)}
  entries = tuple((f'images/{filename}', class_name, stats[filename].st_size,
                   stats[filename].st_mtime_ns) for filename, class_name in rows)
  return SplitFiles(split, tuple(os.path.join(images_dir, filename) for filename, _ in rows),
                    np.asarray([label_of[c] for _, c in rows], np.int64), layout.class_names,
                    entries, csv_path)


def _file_entry(path: str, root: str, class_name: str) -> Tuple[str, str, int, int]:
  """`SplitFiles.entries`' row of one image file."""
  stat = os.stat(path)
  return os.path.relpath(path, root), class_name, stat.st_size, stat.st_mtime_ns


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
          entries.append(_file_entry(path, layout.root, class_name))
    if len(paths) == count:
      empty.append(class_name)
  if not paths:
    raise UserError(f'split {split!r} of data.root={layout.root} holds no images (looked for '
                    f'{directory}/<class>/*{{{",".join(IMAGE_EXTENSIONS)}}}); put the images '
                    'there or fix data.root')
  if empty:
    logging.warning('split %r: class folder(s) without images: %s', split, ', '.join(empty[:5]))
  return SplitFiles(split, tuple(paths), np.asarray(labels, np.int64), layout.class_names,
                    tuple(entries), directory)


def _image_files(directory: str, recursive: bool) -> List[str]:
  """The image files directly in `directory`, or at any depth below it (sorted walk, hidden
  folders such as our own .cache skipped), in a fixed order."""
  if not recursive:
    with os.scandir(directory) as entries:
      return sorted(os.path.join(directory, e.name) for e in entries
                    if _is_image(e.name) and e.is_file())
  paths = []
  for walk_root, dirnames, filenames in os.walk(directory, followlinks=True):
    dirnames[:] = sorted(name for name in dirnames if not name.startswith('.'))
    paths += [os.path.join(walk_root, name) for name in sorted(filenames) if _is_image(name)]
  return paths


def _unlabelled_split_files(layout: _Layout) -> SplitFiles:
  """The one unlabelled split: the image files in data.root ('flat') or under it ('tree')."""
  paths = _image_files(layout.root, recursive=layout.kind == 'tree')
  if not paths:
    raise UserError(f'data.root={layout.root} holds no image files at any depth (looked for '
                    f'*{{{",".join(IMAGE_EXTENSIONS)}}}); put the images there or fix data.root')
  entries = tuple(_file_entry(path, layout.root, '') for path in paths)
  return SplitFiles(UNLABELLED_SPLIT, tuple(paths), None, (), entries, layout.root)


def list_split_files(data_config, split: str, setting: str = 'data split') -> List[SplitFiles]:
  """The image files of every split named in `split` ('+'-joined), validated; no decoding.

  Unlabelled images are one split, which every name names: it is returned once.
  """
  layout = _layout(data_config)
  logging.info('%s: %s layout in %s, splits %s', data_config.name, layout.kind, layout.root,
               ', '.join(sorted(layout.splits)))
  if layout.kind in ('flat', 'tree'):
    split_names(split, setting)
    return [_unlabelled_split_files(layout)]
  result = []
  for name in split_names(split, setting):
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
# Sources of image files, from the decoded-image cache.


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
  eval_resize = resolved_eval_resize(data_config)
  sources = []
  for files in list_split_files(data_config, split, setting):
    _warn_if_not_standard(data_config, files)
    sources.append(ArraySource(cache.cached_images(data_config, files, eval_resize),
                               files.labels, f'{data_config.name}/{files.split}',
                               files.class_names, files.paths))
  return _concat(sources, f'{data_config.name}/{split}')


# ----------------------------------------------------------------------------------------------
# The size of the stored images, for data.eval_resize=auto.

# Image folders: headers read of the first files of up to this many classes per split.
SAMPLE_CLASSES = 8
SAMPLE_FILES_PER_CLASS = 4


def _sample_image_paths(layout: _Layout) -> List[str]:
  """A few image files of every split of an ImageFolder tree, always the same ones: the first
  `SAMPLE_FILES_PER_CLASS` (in ImageFolder order) of up to `SAMPLE_CLASSES` class folders spread
  evenly over each split's sorted classes."""
  if layout.kind in ('flat', 'tree'):
    return _image_files(layout.root, layout.kind == 'tree')[:SAMPLE_CLASSES *
                                                              SAMPLE_FILES_PER_CLASS]
  paths = []
  for split in sorted(layout.splits):
    directory = layout.splits[split]
    classes = _subdirs(directory)
    for class_name in classes[::max(1, len(classes) // SAMPLE_CLASSES)][:SAMPLE_CLASSES]:
      found = []
      for walk_root, dirnames, filenames in os.walk(os.path.join(directory, class_name),
                                                    followlinks=True):
        dirnames.sort()
        found += [os.path.join(walk_root, name) for name in sorted(filenames) if _is_image(name)]
        if len(found) >= SAMPLE_FILES_PER_CLASS:
          break
      paths += found[:SAMPLE_FILES_PER_CLASS]
  return paths


def _median_short_side(paths: Sequence[str]):
  """The median (lower) short side of the images at `paths`, from their headers only (PIL
  decodes no pixels for `.size`); files that do not open are skipped (the cache names them).
  None when none opens."""
  sides = []
  for path in paths:
    try:
      with Image.open(path) as image:
        sides.append(min(image.size))
    except Exception:  # pylint: disable=broad-except
      continue
  return sorted(sides)[(len(sides) - 1) // 2] if sides else None


def stored_image_size(data_config):
  """Short side of the images the eval transform receives, for `data.eval_resize=auto`.

  digits and fake: `data.image_size` (they are made at that size); mini-ImageNet: its cache's
  side (84, or `data.cache_size`); an image folder: `data.cache_size` when set, else the median
  short side of a fixed sample of its files (`_sample_image_paths`, headers only: milliseconds),
  None when no sampled file opens.
  """
  name = data_config.name
  if name == 'digits':
    return max(int(data_config.image_size), 8)
  if name == 'fake':
    return int(data_config.image_size)
  cache_size = int(data_config.get('cache_size', 0) or 0)
  if cache_size > 0:
    return cache_size
  if name == 'mini_imagenet':
    return cache.MINI_IMAGENET_SIZE
  return _median_short_side(_sample_image_paths(_layout(data_config)))


def resolved_eval_resize(data_config) -> str:
  """`data.eval_resize` resolved for this dataset: 'whole' or 'center'
  (`recipes.resolve_eval_resize`; 'auto' looks at `stored_image_size`)."""
  setting = data_config.eval_resize
  stored = stored_image_size(data_config) if setting == 'auto' else None
  return recipes.resolve_eval_resize(setting, int(data_config.image_size), stored)


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
