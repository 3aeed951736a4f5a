r"""The small-image recipe (configs/small_images.py) against plain PCL and the runners-up, 5 seeds.

  python -m pcl_jax.study --study=configs/studies/recipe.py --workdir=/tmp/study_recipe \
      --config.data.root=/tmp/dev_patches
  # the check on pictures the recipe was not chosen on (benchmarks/holdout_patches.py):
  python -m pcl_jax.study --study=configs/studies/recipe.py --workdir=/tmp/study_holdout \
      --config.data.root=/tmp/holdout_patches

`plain` is PCL as published at the reference run's budget (configs/small_images_plain.py, the
baseline of configs/studies/remedies.py too: cells of the same config are the same runs), and
`small_images` adds configs/small_images.py's RECIPE (false-negative attraction with half of
InfoNCE's target on the own key, and ProtoNCE at half weight). Runners-up of
configs/studies/recipe_candidates.py ride along: `attract` (uniform attraction, the recipe before
the share), `attract_graded` (attraction graded over the levels: the largest NMI gain there, with
kNN level), `masked_half_proto` (the mask instead of the attraction: the largest kNN gain on the
development patches) and `attract_coarse` (attraction by the coarsest level). On the development
patches every cell is a candidates' cell under another name (the same config). Every cell checks
the validation kNN every 3 epochs, as in the other studies.
"""

from configs import small_images
from configs.studies import recipe_candidates


def get_study():
  """recipe_candidates.py's base, settings and seeds (its `plain` cells are these)."""
  study = recipe_candidates.get_study()
  candidates = study['variants']
  study['variants'] = {
      'plain': {},
      'small_images': dict(small_images.RECIPE),
      'attract': candidates['attract'],
      'attract_graded': candidates['attract_graded'],
      'masked_half_proto': candidates['small_images'],
      'attract_coarse': candidates['attract_coarse'],
  }
  return study
