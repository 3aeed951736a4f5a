r"""A held-out small image set: 10 classes of patches of pictures the development set does not use.

  python benchmarks/holdout_patches.py /tmp/holdout_patches [per_class=150] [size=32]

The development set (../shared/data/make_dev_patches.py) is where the small-image recipe
(configs/small_images.py) was chosen among candidates; a recipe chosen there can fit its
pictures. This set is built the same way (ImageFolder: OUT/train/<class>/*.png, OUT/test/...,
OUT/val = a copy of test; a patch's class is its source picture; random square patches of 36 to
90 px resized to `size`) from ten other pictures bundled with scikit-image, among them three
textures (brick, grass, gravel), a telescope field and a retina: data of another kind. The recipe
is confirmed on it, never tuned on it:

  python -m pcl_jax.study --study=configs/studies/recipe.py --workdir=/tmp/study_holdout \
      --config.data.root=/tmp/holdout_patches

Needs scikit-image (`pip install scikit-image`); nothing is downloaded.
"""

import os
import sys

import numpy as np
from PIL import Image

# Class name -> file in skimage/data; none of them is a source of the development set.
SOURCES = {
    'astronaut': 'astronaut.png',
    'brick': 'brick.png',
    'camera': 'camera.png',
    'cat': 'chelsea.png',
    'coffee': 'coffee.png',
    'coins': 'coins.png',
    'grass': 'grass.png',
    'gravel': 'gravel.png',
    'hubble': 'hubble_deep_field.jpg',
    'retina': 'retina.jpg',
}
SEED = 2025  # not the development set's


def source_paths():
  """{class: path} of the bundled pictures (scikit-image's data directory)."""
  import skimage  # pylint: disable=g-import-not-at-top
  directory = os.path.join(os.path.dirname(skimage.__file__), 'data')
  return {name: os.path.join(directory, file) for name, file in SOURCES.items()}


def random_patch(image, rng, size):
  """A random square patch of 36-90 px (at most half the shorter side), resized to `size`."""
  width, height = image.size
  shorter = min(width, height)
  side = int(rng.integers(min(36, shorter // 4), min(90, shorter // 2)))
  x = int(rng.integers(0, width - side))
  y = int(rng.integers(0, height - side))
  return image.crop((x, y, x + side, y + side)).resize((size, size), Image.BILINEAR)


def write_patches(out, per_class=150, size=32):
  """Writes OUT/{train,test,val}/<class>/NNNN.png: per_class train and per_class // 3 test
  patches per class (val is a copy of test)."""
  rng = np.random.default_rng(SEED)
  for name, path in sorted(source_paths().items()):
    image = Image.open(path).convert('RGB')
    for split, count in (('train', per_class), ('test', per_class // 3)):
      for j in range(count):
        patch = random_patch(image, rng, size)
        for target in (split, 'val') if split == 'test' else (split,):
          folder = os.path.join(out, target, name)
          os.makedirs(folder, exist_ok=True)
          patch.save(os.path.join(folder, f'{j:04d}.png'))
  return out


if __name__ == '__main__':
  print(write_patches(sys.argv[1], *(int(a) for a in sys.argv[2:4])))
