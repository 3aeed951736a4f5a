r"""The small-image recipe (configs/small_images.py) against plain PCL, 5 seeds.

  python -m pcl_jax.study --study=configs/studies/recipe.py --workdir=/tmp/study_recipe \
      --config.data.root=/tmp/dev_patches

`plain` is PCL as published at the reference run's budget (configs/small_images_plain.py, the
baseline of configs/studies/remedies.py too: cells of the same config are the same runs), and
`small_images` adds configs/small_images.py's RECIPE. Every cell checks the validation kNN every
3 epochs, as in the other studies.
"""

import importlib.util
import os


def _recipe():
  """configs/small_images.py's RECIPE, loaded by path (study files are loaded by path too)."""
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      'small_images.py')
  spec = importlib.util.spec_from_file_location('small_images', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return dict(module.RECIPE)


def get_study():
  return {
      'config': 'configs/small_images_plain.py',
      'overrides': {'eval.val_every': 3},
      'variants': {
          'plain': {},
          'small_images': _recipe(),
      },
      'baseline': 'plain',
      'seeds': [0, 1, 2, 3, 4],
  }
