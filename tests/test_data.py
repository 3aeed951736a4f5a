"""Data: both mini-ImageNet layouts and ImageFolder trees of real JPEGs, the decoded-image cache
(reuse, rebuild, atomicity), index alignment, both augmentation recipes, seeded batches, and
every bad-input message. Tiny data (4 classes x 6 images of 24x20 px), CPU only, seconds."""

import os
import zlib

import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest
from torchvision import transforms

from configs import default
from pcl_jax.configuration import UserError
from pcl_jax.data import cache
from pcl_jax.data import device_transforms
from pcl_jax.data import loaders
from pcl_jax.data import recipes
from pcl_jax.data import sources
from pcl_jax.data import transforms as data_transforms

CLASSES = ('n01', 'n02', 'n03', 'n04')
# mini-ImageNet style: disjoint classes per split.
SPLIT_CLASSES = {'train': ('n01', 'n02'), 'val': ('n03',), 'test': ('n04',)}
PER_CLASS = 6
# ImageNet normalisation maps [0, 1] to these bounds.
LOW = min((0 - m) / s for m, s in zip(recipes.MEAN, recipes.STD))
HIGH = max((1 - m) / s for m, s in zip(recipes.MEAN, recipes.STD))


def _write_jpeg(path, seed, size=(24, 20)):
  """A random-noise JPEG (each file distinct, so index mix-ups show)."""
  pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
  Image.fromarray(pixels).save(path, quality=90)


def _seed(class_name, number):
  return zlib.crc32(f'{class_name}/{number}'.encode())


def _file_name(class_name, number):
  return f'{class_name}{number:08d}.jpg'


def make_csv_layout(root):
  """Ravi & Larochelle layout: DIR/images/*.jpg + DIR/{train,val,test}.csv."""
  os.makedirs(root / 'images')
  for split, classes in SPLIT_CLASSES.items():
    rows = ['filename,label']
    for class_name in classes:
      for number in range(PER_CLASS):
        name = _file_name(class_name, number)
        _write_jpeg(root / 'images' / name, seed=_seed(class_name, number))
        rows.append(f'{name},{class_name}')
    (root / f'{split}.csv').write_text('\n'.join(rows) + '\n')
  return root


def make_folder_layout(root, split_classes=None):
  """ImageFolder layout: DIR/{split}/<class>/*.jpg (same files as the CSV layout)."""
  for split, classes in (split_classes or SPLIT_CLASSES).items():
    for class_name in classes:
      os.makedirs(root / split / class_name)
      for number in range(PER_CLASS):
        _write_jpeg(root / split / class_name / _file_name(class_name, number),
                    seed=_seed(class_name, number))
  return root


def make_config(root, name='mini_imagenet', image_size=16, batch_size=4, aug_plus=True):
  config = default.get_config()
  config.data.name = name
  config.data.root = str(root)
  config.data.image_size = image_size
  config.data.aug_plus = aug_plus
  config.data.num_workers = 0
  config.train.batch_size = batch_size
  return config


@pytest.fixture
def csv_root(tmp_path):
  return make_csv_layout(tmp_path / 'mini_csv')


@pytest.fixture
def folder_root(tmp_path):
  return make_folder_layout(tmp_path / 'mini_folder')


@pytest.fixture
def decode_counter(monkeypatch):
  """Counts calls of the one-time decoder (the cache build)."""
  calls = []
  original = cache._decode_image

  def counting(path, size, mode):
    calls.append(path)
    return original(path, size, mode)

  monkeypatch.setattr(cache, '_decode_image', counting)
  return calls


# ----------------------------------------------------------------------------------------------
# Splits, labels, cache contents.


@pytest.mark.parametrize('layout', ['csv', 'folder'])
def test_mini_imagenet_split_sizes_and_labels(layout, csv_root, folder_root):
  root = csv_root if layout == 'csv' else folder_root
  data = make_config(root).data
  sizes = {split: len(sources.load_source(data, split)) for split in SPLIT_CLASSES}
  assert sizes == {'train': 12, 'val': 6, 'test': 6}
  joined = sources.load_source(data, 'train+val+test')
  assert len(joined) == 24
  assert joined.class_names == CLASSES
  # Labels: sorted class names over the union of every split, whatever split is loaded.
  np.testing.assert_array_equal(joined.labels, np.repeat(np.arange(4), PER_CLASS))
  assert set(sources.load_source(data, 'test').labels) == {3}
  assert set(sources.load_source(data, 'val').labels) == {2}
  assert joined.images.shape == (24, 84, 84, 3)  # mini-ImageNet caches at 84 px
  assert joined.name == 'mini_imagenet/train+val+test'


def test_both_layouts_give_the_same_dataset(csv_root, folder_root):
  from_csv = sources.load_source(make_config(csv_root).data, 'train+test')
  from_folders = sources.load_source(make_config(folder_root).data, 'train+test')
  np.testing.assert_array_equal(from_csv.labels, from_folders.labels)
  np.testing.assert_array_equal(np.asarray(from_csv.images), np.asarray(from_folders.images))


def test_cache_rows_are_the_files_in_index_order(csv_root):
  data = make_config(csv_root).data
  source = sources.load_source(data, 'train+val')
  paths = [p for files in sources.list_split_files(data, 'train+val') for p in files.paths]
  assert len(paths) == len(source)
  for index in (0, 7, 12, 17):
    # mini-ImageNet preprocessing: squash to 84x84 with Lanczos (decoded independently here).
    with Image.open(paths[index]) as image:
      expected = np.asarray(image.convert('RGB').resize((84, 84), Image.LANCZOS))
    np.testing.assert_array_equal(np.asarray(source.images[index]), expected)
    class_name = os.path.basename(paths[index])[:3]
    assert source.class_names[source.labels[index]] == class_name


def test_image_folder_tree_and_flat_root(tmp_path):
  shared = {'train': ('cat', 'dog'), 'test': ('cat', 'dog', 'eel')}
  root = make_folder_layout(tmp_path / 'tree', shared)
  data = make_config(root, name='image_folder', image_size=16).data
  train = sources.load_source(data, 'train')
  test = sources.load_source(data, 'test')
  assert (len(train), len(test)) == (12, 18)
  assert train.class_names == ('cat', 'dog', 'eel')  # union over splits: same labels in both
  np.testing.assert_array_equal(train.labels, np.repeat([0, 1], PER_CLASS))
  np.testing.assert_array_equal(test.labels, np.repeat([0, 1, 2], PER_CLASS))
  # image_folder caches at the eval resize size: short side 18 (= 16 * 8/7), center-cropped.
  assert train.images.shape == (12, 18, 18, 3)
  # A root that holds class folders directly is one split named 'all'.
  flat = make_folder_layout(tmp_path / 'flat', {'.': ('cat', 'dog')})
  flat_data = make_config(flat, name='image_folder').data
  assert len(sources.load_source(flat_data, 'all')) == 12
  with pytest.raises(UserError, match="one split named 'all'"):
    sources.load_source(flat_data, 'train', setting='data.train_split')


def _write_photos(directory, names):
  os.makedirs(directory, exist_ok=True)
  for name in names:
    _write_jpeg(os.path.join(directory, name), seed=zlib.crc32(str(directory / name).encode()))


def test_a_folder_of_image_files_is_one_unlabelled_split_every_setting_names(tmp_path):
  root = tmp_path / 'photos'
  _write_photos(root, ['b.jpg', 'a.png', 'c.JPEG'])
  (root / 'notes.txt').write_text('not an image')
  data = make_config(root, name='image_folder').data
  train = sources.load_source(data, 'train', setting='data.train_split')
  assert train.labels is None and train.class_names == ()
  assert train.paths == tuple(str(root / name) for name in ('a.png', 'b.jpg', 'c.JPEG'))
  for split in ('test', 'all', 'train+val'):  # the same images, once
    other = sources.load_source(data, split)
    assert other.paths == train.paths
    np.testing.assert_array_equal(np.asarray(other.images), np.asarray(train.images))
  for index, path in enumerate(train.paths):  # rows are the files, in path order
    with Image.open(path) as image:
      expected = transforms.CenterCrop(18)(transforms.Resize(18)(image.convert('RGB')))
    np.testing.assert_array_equal(np.asarray(train.images[index]), np.asarray(expected))
  # Its cache (root/.cache) is a hidden folder, not a class folder: still one split.
  assert os.path.isdir(root / '.cache')
  assert sources.load_source(data, 'train').labels is None
  eval_view = loaders.build_eval_dataset(make_config(root, name='image_folder'))
  assert eval_view[1][1:] == (-1, 1)  # (image, label -1: none, index)


def test_labels_false_reads_every_image_at_any_depth_ignoring_folders(tmp_path):
  root = tmp_path / 'camera'
  _write_photos(root / '2026-12-01', ['x.jpg', 'y.jpg'])
  _write_photos(root / '2026-12-02' / 'burst', ['a.jpg'])
  _write_photos(root / '2026-12-02', ['z.jpg'])
  _write_photos(root / '.hidden', ['skipped.jpg'])
  data = make_config(root, name='image_folder').data
  dated = sources.load_source(data, 'all')  # by default the dates are class folders
  assert dated.class_names == ('2026-12-01', '2026-12-02') and dated.labels.tolist() == [
      0, 0, 1, 1]
  data.labels = False
  flat = sources.load_source(data, 'train')
  assert flat.labels is None
  assert [os.path.relpath(path, root) for path in flat.paths] == [
      '2026-12-01/x.jpg', '2026-12-01/y.jpg', '2026-12-02/z.jpg', '2026-12-02/burst/a.jpg']
  os.makedirs(tmp_path / 'no_images' / 'empty_day')
  with pytest.raises(UserError, match='holds no image files at any depth'):
    sources.load_source(_unlabelled_data(tmp_path / 'no_images'), 'train')


def _unlabelled_data(root):
  data = make_config(root, name='image_folder').data
  data.labels = False
  return data


def test_loose_images_beside_folders_name_data_labels(tmp_path):
  root = tmp_path / 'mixed'
  _write_photos(root, ['loose.jpg'])
  _write_photos(root / 'cats', ['c.jpg'])
  with pytest.raises(UserError, match='holds image files and folders.*data.labels=False'):
    sources.load_source(make_config(root, name='image_folder').data, 'train')
  assert len(sources.load_source(_unlabelled_data(root), 'train')) == 2


def test_cache_dir_setting_and_joined_splits_stay_memory_mapped(csv_root, tmp_path):
  config = make_config(csv_root)
  config.data.cache_dir = str(tmp_path / 'caches')
  joined = sources.load_source(config.data, 'train+val')
  assert isinstance(joined.images, sources.ConcatenatedImages)
  assert all(isinstance(part, np.memmap) for part in joined.images.parts)
  cached = sorted(os.listdir(tmp_path / 'caches'))
  assert len([n for n in cached if n.endswith('.npy')]) == 2
  assert len([n for n in cached if n.endswith('.json')]) == 2
  assert not os.path.exists(csv_root / '.cache')
  np.testing.assert_array_equal(joined.images[-1], np.asarray(joined.images)[-1])


# ----------------------------------------------------------------------------------------------
# The cache: reuse, rebuild, atomic builds.


def _npy_files(root):
  return sorted((root / '.cache').glob('*.npy'))


def test_cache_is_reused_then_rebuilt_when_the_dataset_changes(folder_root, decode_counter):
  data = make_config(folder_root).data
  first = sources.load_source(data, 'train')
  assert len(decode_counter) == 12
  [npy_path] = _npy_files(folder_root)
  built_at = os.stat(npy_path).st_mtime_ns
  decode_counter.clear()
  again = sources.load_source(data, 'train')
  assert not decode_counter  # nothing decoded the second time
  assert os.stat(npy_path).st_mtime_ns == built_at
  np.testing.assert_array_equal(np.asarray(again.images), np.asarray(first.images))
  # A new image: the file list changed, the cache is rebuilt.
  _write_jpeg(folder_root / 'train' / 'n01' / 'extra.jpg', seed=99)
  grown = sources.load_source(data, 'train')
  assert len(grown) == 13 and len(decode_counter) == 13
  # A replaced image of another size: rebuilt too.
  decode_counter.clear()
  _write_jpeg(folder_root / 'train' / 'n02' / _file_name('n02', 0), seed=5, size=(40, 30))
  sources.load_source(data, 'train')
  assert len(decode_counter) == 13
  # A different cache size (another image size for image_folder / cache_size): its own cache.
  decode_counter.clear()
  data.cache_size = 32
  assert sources.load_source(data, 'train').images.shape == (13, 32, 32, 3)
  assert len(decode_counter) == 13


def test_damaged_cache_is_rebuilt(csv_root, decode_counter):
  data = make_config(csv_root).data
  sources.load_source(data, 'val')
  [npy_path] = _npy_files(csv_root)
  with open(npy_path, 'r+b') as npy_file:
    npy_file.truncate(os.path.getsize(npy_path) // 2)
  decode_counter.clear()
  source = sources.load_source(data, 'val')
  assert len(decode_counter) == 6 and source.images.shape == (6, 84, 84, 3)


def test_killed_build_leaves_no_cache(csv_root, monkeypatch):
  data = make_config(csv_root).data
  calls = []
  original = cache._decode_image

  def interrupted(path, size, mode):
    calls.append(path)
    if len(calls) == 3:
      raise KeyboardInterrupt  # what Ctrl-C / a kill does mid-build
    return original(path, size, mode)

  monkeypatch.setattr(cache, '_decode_image', interrupted)
  monkeypatch.setattr(cache, '_decode_threads', lambda: 1)
  with pytest.raises(KeyboardInterrupt):
    sources.load_source(data, 'train')
  assert os.listdir(csv_root / '.cache') == []  # no partial .npy, no temp file, no manifest
  # A temp file of a build killed with SIGKILL (its pid is gone) is swept by the next build.
  stem = 'mini_imagenet-train-84px-squash.npy'
  import socket  # pylint: disable=g-import-not-at-top
  stale = csv_root / '.cache' / f'{stem}.tmp-{socket.gethostname()}-{2**22 + 4321}'
  stale.write_bytes(b'partial')
  monkeypatch.setattr(cache, '_decode_image', original)
  assert len(sources.load_source(data, 'train')) == 12
  assert sorted(os.listdir(csv_root / '.cache')) == [stem[:-4] + '.json', stem]


# ----------------------------------------------------------------------------------------------
# Datasets, transforms, loaders.


def test_train_and_eval_views_are_index_aligned(csv_root):
  config = make_config(csv_root, batch_size=4)
  datasets = loaders.build_train_datasets(config)
  assert datasets.num_train == 12
  assert datasets.train.source is datasets.train_eval.source
  batches = list(loaders.numpy_batches(
      loaders.eval_loader(datasets.train_eval, 5, num_workers=0)))
  index = np.concatenate([b['index'] for b in batches])
  # Dataset order; the last batch is padded to full size by repeating the last image.
  np.testing.assert_array_equal(index, list(range(12)) + [11, 11, 11])
  np.testing.assert_array_equal(np.concatenate([b['label'] for b in batches])[:12],
                                datasets.train_eval.source.labels)
  image = batches[1]['image'][2]  # index 7
  assert datasets.train_eval.eval_resize == 'center'  # 84 px mini-ImageNet at crop 16: larger
  expected = data_transforms.eval_transform(16, 'center')(datasets.train.source.image(7)).numpy()
  np.testing.assert_allclose(image, expected)
  assert batches[0]['image'].shape == (5, 16, 16, 3) and batches[0]['image'].dtype == np.float32
  evaluation = loaders.build_eval_dataset(config)
  assert len(evaluation) == 6 and set(evaluation.source.labels) == {3}


@pytest.mark.parametrize('aug_plus', [True, False])
def test_training_batches_shapes_and_ranges(csv_root, aug_plus):
  config = make_config(csv_root, image_size=16, batch_size=4, aug_plus=aug_plus)
  datasets = loaders.build_train_datasets(config)
  batches = list(loaders.numpy_batches(
      loaders.train_loader(datasets.train, 4, seed=0, epoch=0, num_workers=0)))
  assert len(batches) == 3  # 12 images, drop_last
  # The same augmentations ending in torchvision-style float normalisation on the host.
  augment = data_transforms.train_transform(16, aug_plus).transforms[:-1]
  float_views = loaders.TwoCropDataset(datasets.train.source, transforms.Compose(
      augment + [data_transforms.ToNormalizedHWC()]))
  float_batches = list(loaders.numpy_batches(
      loaders.train_loader(float_views, 4, seed=0, epoch=0, num_workers=0)))
  for batch, float_batch in zip(batches, float_batches):
    assert set(batch) == {'im_q', 'im_k', 'index'}
    for view in ('im_q', 'im_k'):
      assert batch[view].shape == (4, 16, 16, 3) and batch[view].dtype == np.uint8
      # Normalised on the device: bit-equal to the host's float pipeline, within its range.
      normalised = np.asarray(device_transforms.normalize(jnp.asarray(batch[view])))
      np.testing.assert_array_equal(normalised, float_batch[view])
      assert LOW - 1e-5 <= normalised.min() and normalised.max() <= HIGH + 1e-5
    assert batch['index'].dtype == np.int64
    assert not np.array_equal(batch['im_q'], batch['im_k'])  # two independent augmentations
  index = np.concatenate([b['index'] for b in batches])
  assert sorted(index) == list(range(12))  # a permutation of the split


@pytest.mark.parametrize('eval_resize,resize', [('center', 18), ('whole', 16)])
def test_eval_transform_matches_torchvision_reference(eval_resize, resize):
  image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), np.uint8))
  reference = transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(16),
                                  transforms.ToTensor(),
                                  transforms.Normalize(recipes.MEAN, recipes.STD)])
  np.testing.assert_allclose(data_transforms.eval_transform(16, eval_resize)(image).numpy(),
                             reference(image).permute(1, 2, 0).numpy(), atol=1e-5)


@pytest.mark.parametrize('setting,image_size,stored,resolved', [
    ('auto', 32, 32, 'whole'),  # patches stored at the crop size (the dev set)
    ('auto', 32, 8, 'whole'),  # smaller than the crop: upscaled whole either way
    ('auto', 84, 84, 'whole'),  # mini-ImageNet at 84
    ('auto', 32, 37, 'whole'),  # 8/7 of the crop, the largest kept whole
    ('auto', 32, 38, 'center'),
    ('auto', 64, 84, 'center'),  # mini-ImageNet at a smaller crop
    ('auto', 224, 375, 'center'),  # ImageNet photos
    ('auto', 32, None, 'center'),  # unknown: the ImageNet protocol
    ('whole', 224, 375, 'whole'),
    ('center', 32, 32, 'center'),
])
def test_eval_resize_resolution(setting, image_size, stored, resolved):
  assert recipes.resolve_eval_resize(setting, image_size, stored) == resolved
  size = recipes.eval_resize_size(image_size, resolved)
  assert size == (image_size if resolved == 'whole' else round(image_size * 8 / 7))


def test_eval_resize_of_each_dataset(csv_root, tmp_path):
  def resolved(name, image_size, root=csv_root, **settings):
    config = make_config(root, name=name, image_size=image_size)
    for field, value in settings.items():
      config.data[field] = value
    return sources.stored_image_size(config.data), sources.resolved_eval_resize(config.data)

  assert resolved('digits', 32) == (32, 'whole')
  assert resolved('fake', 16) == (16, 'whole')
  assert resolved('mini_imagenet', 84) == (84, 'whole')
  assert resolved('mini_imagenet', 64) == (84, 'center')
  assert resolved('mini_imagenet', 64, cache_size=72) == (72, 'whole')
  assert resolved('digits', 32, eval_resize='center') == (32, 'center')
  # Image folders: a fixed sample of the files' headers; 24x20 JPEGs (short side 20).
  folder = make_folder_layout(tmp_path / 'photos')
  assert resolved('image_folder', 16, folder) == (20, 'center')  # 20 > 18 = 8/7 of 16
  assert resolved('image_folder', 18, folder) == (20, 'whole')  # 20 <= 21
  assert resolved('image_folder', 32, folder) == (20, 'whole')


def _write_png_patches(root, size, splits=('train', 'test'), classes=('a', 'b'), per_class=3):
  """Crop-size PNGs, as the development patches: DIR/<split>/<class>/*.png, lossless."""
  for split in splits:
    for class_index, class_name in enumerate(classes):
      os.makedirs(root / split / class_name)
      for number in range(per_class):
        pixels = np.random.default_rng(100 * class_index + number + (split == 'test')).integers(
            0, 256, (size, size, 3), np.uint8)
        Image.fromarray(pixels).save(root / split / class_name / f'{number}.png')
  return root


def test_whole_keeps_the_files_own_pixels_and_caches_at_the_crop(tmp_path, decode_counter):
  """eval_resize auto -> whole on crop-size images: the cache holds the files' pixels (no
  resampling), evaluation sees all of them (as the reference's Resize(32) + CenterCrop(32)),
  training crops from them; 'center' lives in a cache file of its own, and switching back
  reuses the first."""
  root = _write_png_patches(tmp_path / 'patches', 16)
  config = make_config(root, name='image_folder', image_size=16)
  datasets = loaders.build_train_datasets(config)
  assert datasets.train_eval.eval_resize == 'whole'
  images = np.asarray(datasets.train.source.images)
  assert images.shape == (6, 16, 16, 3)
  with Image.open(root / 'train' / 'b' / '1.png') as image:
    np.testing.assert_array_equal(images[4], np.asarray(image.convert('RGB')))
  whole_view = datasets.train_eval[4][0].numpy()
  np.testing.assert_allclose(whole_view, (images[4] / 255.0 - recipes.MEAN) / recipes.STD,
                             atol=1e-5)
  built = len(decode_counter)
  assert built == 6
  config.data.eval_resize = 'center'
  center = loaders.build_train_datasets(config)
  assert center.train_eval.eval_resize == 'center'
  assert center.train.source.images.shape == (6, 18, 18, 3)  # 8/7 of the crop, its own file
  assert len(decode_counter) == built + 6
  cache_files = sorted(os.listdir(root / '.cache'))
  assert [name for name in cache_files if name.endswith('.npy')] == [
      'image_folder-train-16px-short_side_center_crop.npy',
      'image_folder-train-18px-short_side_center_crop.npy']
  config.data.eval_resize = 'auto'
  loaders.build_train_datasets(config)
  assert len(decode_counter) == built + 6  # the 16 px cache is trusted as it is


def test_bad_eval_resize_names_the_setting_and_its_values(csv_root):
  from pcl_jax import configuration  # pylint: disable=g-import-not-at-top
  config = make_config(csv_root)
  config.data.eval_resize = 'crop'
  with pytest.raises(UserError, match=r"data\.eval_resize='crop' is unknown; use one of auto, "
                     r'whole, center'):
    configuration.validate(config)


def _epoch(dataset, seed, epoch, num_workers):
  loader = loaders.train_loader(dataset, 4, seed=seed, epoch=epoch,
                                       num_workers=num_workers)
  return list(loaders.numpy_batches(loader))


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    for name in a:
      np.testing.assert_array_equal(a[name], b[name])


def test_same_seed_and_epoch_give_identical_batches_for_any_worker_count(csv_root):
  datasets = loaders.build_train_datasets(make_config(csv_root, batch_size=4))
  reference = _epoch(datasets.train, seed=3, epoch=1, num_workers=0)
  _assert_same(reference, _epoch(datasets.train, seed=3, epoch=1, num_workers=0))
  _assert_same(reference, _epoch(datasets.train, seed=3, epoch=1, num_workers=2))
  other = _epoch(datasets.train, seed=3, epoch=2, num_workers=0)
  assert not np.array_equal(reference[0]['index'], other[0]['index']) or not np.allclose(
      reference[0]['im_q'], other[0]['im_q'])


def test_fake_source_any_size():
  config = default.get_config()
  config.data.name, config.data.image_size, config.data.fake_size = 'fake', 84, 8
  config.train.batch_size = 4
  datasets = loaders.build_train_datasets(config)
  assert datasets.num_train == 8 and datasets.train.source.images.shape == (8, 84, 84, 3)


# ----------------------------------------------------------------------------------------------
# Bad input: one clear UserError naming the setting (or the file) and the fix.


def test_missing_root(tmp_path):
  config = make_config(tmp_path / 'nowhere')
  with pytest.raises(UserError, match=r'data.root=.*nowhere does not exist.*set data.root'):
    loaders.build_train_datasets(config)


def test_empty_root(tmp_path):
  (tmp_path / 'empty').mkdir()
  with pytest.raises(UserError, match=r'data.root=.*empty is empty'):
    loaders.build_train_datasets(make_config(tmp_path / 'empty'))


def test_root_without_any_known_layout(tmp_path):
  (tmp_path / 'odd').mkdir()
  (tmp_path / 'odd' / 'notes.txt').write_text('hello')
  with pytest.raises(UserError, match='is not a mini-ImageNet directory'):
    loaders.build_train_datasets(make_config(tmp_path / 'odd'))
  with pytest.raises(UserError, match='holds no class folders'):
    loaders.build_train_datasets(make_config(tmp_path / 'odd', name='image_folder'))


def test_images_without_csvs(csv_root):
  for split in SPLIT_CLASSES:
    os.remove(csv_root / f'{split}.csv')
  with pytest.raises(UserError, match='images exists but no CSV'):
    loaders.build_train_datasets(make_config(csv_root))


def test_csv_naming_absent_files(csv_root):
  os.remove(csv_root / 'images' / _file_name('n02', 3))
  with pytest.raises(UserError, match=r'train.csv names 1 file\(s\) absent from .*images, e.g. '
                     r'n0200000003.jpg'):
    loaders.build_train_datasets(make_config(csv_root))


def test_csv_with_a_wrong_header(csv_root):
  text = (csv_root / 'train.csv').read_text().replace('filename,label', 'file,class')
  (csv_root / 'train.csv').write_text(text)
  with pytest.raises(UserError, match=r'train.csv does not start with the header'):
    loaders.build_train_datasets(make_config(csv_root))


def test_malformed_csv_row(csv_root):
  with open(csv_root / 'val.csv', 'a') as csv_file:
    csv_file.write('lonely-field\n')
  with pytest.raises(UserError, match=r'val.csv, line 8: expected "filename,label"'):
    loaders.build_train_datasets(make_config(csv_root))


@pytest.mark.parametrize('damage', ['garbage', 'truncated'])
def test_corrupt_image_is_named(folder_root, damage):
  bad = folder_root / 'train' / 'n02' / _file_name('n02', 4)
  if damage == 'garbage':
    bad.write_bytes(b'this is not a JPEG')
  else:
    bad.write_bytes(bad.read_bytes()[:200])
  with pytest.raises(UserError, match=r'cannot decode 1 image\(s\).*n0200000004.jpg.*Replace or '
                     'delete'):
    loaders.build_train_datasets(make_config(folder_root))
  assert not _npy_files(folder_root)  # nothing half-built is left behind


def test_split_smaller_than_one_batch(csv_root):
  with pytest.raises(UserError, match=r"data.train_split='val' has 6 images, fewer than one batch "
                     r'of train.batch_size=8'):
    config = make_config(csv_root, batch_size=8)
    config.data.train_split = 'val'
    loaders.build_train_datasets(config)


@pytest.mark.parametrize('split', ['trian', 'train+tset'])
def test_unknown_split(csv_root, split):
  config = make_config(csv_root)
  config.data.train_split = split
  with pytest.raises(UserError, match=r"data.train_split: split '(trian|tset)' does not exist.*"
                     'available: test, train, val'):
    loaders.build_train_datasets(config)
  config.data.train_split, config.data.eval_split = 'train', 'testing'
  with pytest.raises(UserError, match=r"data.eval_split: split 'testing' does not exist"):
    loaders.build_eval_dataset(config)


def test_unknown_digits_split():
  config = default.get_config()
  config.data.train_split = 'validation'
  with pytest.raises(UserError, match="split 'validation' does not exist in data.name=digits"):
    loaders.build_train_datasets(config)


def test_unwritable_cache_dir(csv_root, tmp_path):
  blocker = tmp_path / 'file_not_dir'
  blocker.write_text('x')
  config = make_config(csv_root)
  config.data.cache_dir = str(blocker / 'cache')
  with pytest.raises(UserError, match='cannot write the decoded-image cache.*set data.cache_dir'):
    loaders.build_train_datasets(config)


def test_process_shards_are_disjoint_and_union_to_the_single_process_batches(tmp_path):
  source = sources.ArraySource(np.zeros((40, 8, 8, 3), np.uint8), np.arange(40) % 4)
  dataset = loaders.TwoCropDataset(source, data_transforms.train_transform(8, False))
  whole = [b['index'] for b in loaders.numpy_batches(
      loaders.train_loader(dataset, 8, seed=1, epoch=2, num_workers=0))]
  shards = [[b['index'] for b in loaders.numpy_batches(loaders.train_loader(
      dataset, 8, seed=1, epoch=2, num_workers=0, process_index=p, process_count=2))]
            for p in range(2)]
  assert len(whole) == 5 and all(len(s) == 5 for s in shards)
  for step, batch in enumerate(whole):
    np.testing.assert_array_equal(np.concatenate([shards[0][step], shards[1][step]]), batch)
  evaluation = loaders.EvalDataset(source, data_transforms.eval_transform(8, 'whole'))
  eval_shards = [np.concatenate([b['index'] for b in loaders.numpy_batches(
      loaders.eval_loader(evaluation, 16, num_workers=0, process_index=p,
                                 process_count=2))]) for p in range(2)]
  assert len(eval_shards[0]) == len(eval_shards[1]) == 24  # 3 global batches of 16, halved
