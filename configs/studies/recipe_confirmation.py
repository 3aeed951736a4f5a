r"""The recipe against plain PCL on five new seeds (5-9), which no choice of the recipe saw.

  python -m pcl_jax.study --study=configs/studies/recipe_confirmation.py \
      --workdir=/tmp/study_confirmation --config.data.root=/tmp/dev_patches

configs/small_images.py's RECIPE was picked among the candidates of
configs/studies/recipe_candidates.py on seeds 0-4 of the development patches, so its figures on
those seeds carry the selection (the best of several looks better than it is). The same two
variants as configs/studies/recipe.py, `plain` and `small_images`, on seeds that played no part
in the choice, give the development set's unselected estimate.
"""

from configs.studies import recipe


def get_study():
  study = recipe.get_study()
  study['variants'] = {name: study['variants'][name] for name in ('plain', 'small_images')}
  study['seeds'] = [5, 6, 7, 8, 9]
  return study
