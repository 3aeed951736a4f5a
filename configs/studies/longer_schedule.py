r"""Twice the reference run's epochs, plain PCL and the recipe: an exploratory study, 3 seeds.

  python -m pcl_jax.study --study=configs/studies/longer_schedule.py \
      --workdir=/tmp/study_longer --config.data.root=/tmp/dev_patches

The recipe's budget is pinned to the reference run's (30 epochs), where plain PCL's validation
kNN is still rising and no switch or E-step change moved NMI on new seeds (docs/remedies.md).
This asks whether a longer schedule would: `plain_60` and `small_images_60` train 60 epochs (the
cosine schedule stretched over them), against `plain_60` as the baseline; `plain` is plain PCL's
30-epoch cells of configs/studies/recipe_candidates.py (linked into the workdir, reused), so its
row reads the other way round: 30 epochs against 60. Exploratory: three seeds, nothing is chosen
on it.
"""

from configs import small_images
from configs.studies import recipe_candidates

_LONGER = {'train.epochs': 60}


def get_study():
  """recipe_candidates.py's base and settings, seeds 0-2, 60-epoch variants."""
  study = recipe_candidates.get_study()
  study['variants'] = {
      'plain': {},
      'plain_60': dict(_LONGER),
      'small_images_60': {**small_images.RECIPE, **_LONGER},
  }
  study['baseline'] = 'plain_60'
  study['seeds'] = [0, 1, 2]
  return study
