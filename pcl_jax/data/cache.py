"""The decoded-image cache: every image of a split decoded once into a memory-mapped uint8 array.

This module owns `DIR/.cache/*.npy` (or `data.cache_dir`) and its JSON manifest: the cache is
built atomically (temporary file, then rename; the manifest last) and trusted only while the
manifest reads, matches the split's files (path, class, size, modification time) and the cache
settings, and the array file matches the manifest's SHA-256; otherwise it is rebuilt, with a
warning saying why. An image that was there when the cache was built and is gone now is an
error naming it (the cache would otherwise be rebuilt silently without it). Decoding runs on
threads (PIL releases the GIL). The files to decode come from `sources`.
"""

import concurrent.futures
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
from typing import List, Sequence, Tuple

import numpy as np
from PIL import Image
from torchvision.transforms import functional as tv_functional
import tqdm

from pcl_jax.configuration import UserError
from pcl_jax.data import recipes
from pcl_jax.run import files as run_files

MINI_IMAGENET_SIZE = 84
# 2: the manifest lists every file (with its modification time) and the array's SHA-256.
CACHE_FORMAT = 2


def cache_image_size(data_config, eval_resize: str) -> int:
  """Side S of the cached [N, S, S, 3] images.

  `data.cache_size` when set (> 0); else 84 for mini-ImageNet (its native resolution); else the
  eval transform's resize size (`eval_resize` is `data.eval_resize` resolved, 'whole' or
  'center'), so eval needs no further resize and training crops are taken at the resolution the
  network sees: under 'whole' the crop size itself, so images stored at crop size are cached
  as they are (the PyTorch reference crops and evaluates the files' own pixels). Each size is a
  cache file of its own (the size is in its name and manifest).
  """
  size = int(data_config.get('cache_size', 0) or 0)
  if size > 0:
    return size
  if data_config.name == 'mini_imagenet':
    return MINI_IMAGENET_SIZE
  return recipes.eval_resize_size(data_config.image_size, eval_resize)


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


def _expected_manifest(data_config, files, size: int, mode: str) -> dict:
  return {'format': CACHE_FORMAT, 'dataset': data_config.name, 'split': files.split,
          'num_images': len(files.paths), 'files_sha256': files.fingerprint,
          'image_size': size, 'resize': mode, 'shape': [len(files.paths), size, size, 3]}


_CHECKED_FIELDS = ('format', 'num_images', 'files_sha256', 'image_size', 'resize', 'shape')


def _read_manifest(manifest_path: str):
  """The manifest as a dict, or None when it is absent or unreadable."""
  try:
    with open(manifest_path) as manifest_file:
      manifest = json.load(manifest_file)
  except (OSError, ValueError):
    return None
  return manifest if isinstance(manifest, dict) else None


def _files_changed(manifest: dict, files) -> str:
  """What differs between the files a manifest was built from and `files` now (for messages)."""
  try:
    before = {entry[0]: tuple(entry[1:]) for entry in manifest['files']}
  except (KeyError, TypeError, IndexError):
    return 'the file list'
  now = {entry[0]: tuple(entry[1:]) for entry in files.entries}
  changed = sorted(name for name in now if before.get(name, now[name]) != now[name])
  added = sorted(set(now) - set(before))
  removed = sorted(set(before) - set(now))
  parts = [f'{len(names)} {what} (e.g. {names[0]})' for names, what in (
      (changed, 'rewritten or resized'), (added, 'added'), (removed, 'no longer listed'))
           if names]
  return 'files ' + ', '.join(parts) if parts else 'the file order'


def _load_valid_cache(npy_path: str, manifest_path: str, manifest, expected: dict, files):
  """The memory-mapped cache if it can be trusted for `files`, else (None, why not); `manifest`
  is what `_read_manifest(manifest_path)` read."""
  if not os.path.exists(manifest_path) or not os.path.exists(npy_path):
    return None, 'no cache yet'
  if manifest is None:
    return None, f'its manifest {manifest_path} is unreadable'
  changed = [field for field in _CHECKED_FIELDS if manifest.get(field) != expected[field]]
  if changed == ['files_sha256']:
    return None, f'the data changed since it was built: {_files_changed(manifest, files)}'
  if changed:
    return None, f'dataset or settings changed ({", ".join(changed)})'
  if os.path.getsize(npy_path) != manifest.get('npy_bytes'):
    return None, 'the array file has the wrong size'
  try:
    images = np.load(npy_path, mmap_mode='r')
  except (OSError, ValueError):
    return None, 'the array file is unreadable'
  if list(images.shape) != expected['shape'] or images.dtype != np.uint8:
    return None, 'the array file has the wrong shape'
  if run_files.file_digest(npy_path)[1] != manifest.get('npy_sha256'):
    return None, 'the array file differs from what was written (SHA-256)'
  return images, ''


def _check_no_file_deleted(manifest, root: str, npy_path: str) -> None:
  """UserError naming an image that the cache (with this manifest) was built from and that is
  gone from disk: a rebuild would silently drop it from the dataset."""
  entries = manifest.get('files') if manifest else None
  if not isinstance(entries, list):
    return
  gone = [entry[0] for entry in entries if isinstance(entry, list) and entry
          and not os.path.exists(os.path.join(root, entry[0]))]
  if gone:
    more = f' (and {len(gone) - 1} more)' if len(gone) > 1 else ''
    raise UserError(f'image {os.path.join(root, gone[0])}{more} was there when the decoded-image '
                    f'cache {npy_path} was built and is gone now; restore it, or delete '
                    f'{npy_path} and its .json to rebuild the cache without it')


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


def _build_cache(files, npy_path: str, manifest_path: str, expected: dict,
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
    npy_sha256 = run_files.file_digest(temporary)[1]
    os.replace(temporary, npy_path)
  except BaseException:
    executor.shutdown(wait=True, cancel_futures=True)
    if os.path.exists(temporary):
      os.remove(temporary)
    raise
  executor.shutdown(wait=True)
  # The manifest is written last: it is what marks the cache as complete.
  run_files.write_json_atomic(manifest_path, {
      **expected, 'npy_bytes': os.path.getsize(npy_path), 'npy_sha256': npy_sha256,
      'files': [list(entry) for entry in files.entries], 'source': files.where,
      'built': time.strftime('%Y-%m-%dT%H:%M:%S')})
  logging.info('decoded %d images of %s into %s in %.1fs', num, files.split, npy_path,
               time.perf_counter() - start)


def cached_images(data_config, files, eval_resize: str) -> np.ndarray:
  """The decoded images of `files` (a `sources.SplitFiles`) as a read-only memory-mapped uint8
  [N, S, S, 3] array, S = `cache_image_size(data_config, eval_resize)`.

  Built on first use, and rebuilt whenever it cannot be trusted (module docstring), under
  data.cache_dir, or DIR/.cache when that is ''.
  """
  root = os.path.abspath(os.path.expanduser(str(data_config.root)))
  size, mode = cache_image_size(data_config, eval_resize), _resize_mode(data_config.name)
  npy_path, manifest_path = _cache_paths(data_config, root, files.split, size, mode)
  expected = _expected_manifest(data_config, files, size, mode)
  manifest = _read_manifest(manifest_path)
  _check_no_file_deleted(manifest, root, npy_path)
  images, reason = _load_valid_cache(npy_path, manifest_path, manifest, expected, files)
  if images is not None:
    return images
  if os.path.exists(npy_path) or os.path.exists(manifest_path):
    logging.warning('the decoded-image cache %s cannot be used: %s; rebuilding it', npy_path,
                    reason)
  else:
    logging.info('building the decoded-image cache %s', npy_path)
  _build_cache(files, npy_path, manifest_path, expected, f'data.root={data_config.root}')
  images, reason = _load_valid_cache(npy_path, manifest_path, _read_manifest(manifest_path),
                                     expected, files)
  if images is None:  # e.g. a concurrent build replaced it with a different dataset version
    raise UserError(f'the decoded-image cache {npy_path} was changed while it was built '
                    f'({reason}); rerun, with one run building it at a time')
  return images
