r"""Changes to the E-step's clusters against plain PCL, 5 seeds each: a screen.

  python -m pcl_jax.study --study=configs/studies/e_step.py \
      --workdir=/tmp/study_e_step --config.data.root=/tmp/dev_patches

`plain` and `small_images` are the cells `plain` and `attract_half` (the recipe) of
configs/studies/recipe_candidates.py: linked into the workdir, they are reused, not retrained.
The loss changes measured so far change what the encoder is pulled towards, never the clusters
themselves, and none moved NMI on seeds no choice saw (docs/remedies.md). These candidates change
the clusters, each for a reason from the literature, and were fixed before any of them ran:
  balanced                 equal-sized clusters at every level (clustering.levels=balanced:
                           SeLa's and SwAV's Sinkhorn-Knopp equipartition, SwAV's epsilon 0.05
                           and 3 iterations): k-means on small image sets leaves singletons
                           next to clusters several times the mean size, and ProtoNCE pulls
                           every member of a crowded cluster, often of several classes, to one
                           prototype;
  small_images_balanced    the recipe (configs/small_images.py) with them;
  hierarchical             HCSC's hierarchical prototypes (clustering.levels=hierarchical: each
                           level clusters the finer level's centroids, so a sample's coarse
                           prototype is the parent of its fine one): flat levels can pull a
                           sample to prototypes that disagree about its neighbours;
  small_images_hierarchical  the recipe with them.
The rule, also fixed before they ran: five seeds cannot resolve an NMI change below ~0.015
(paired sd ~0.011), so this is a screen, not the test. A candidate whose kNN and NMI
differences against plain PCL are both above 0 goes on to the 23 new seeds of
configs/studies/recipe_confirmation.py (plain PCL's cells there reused); if several do, the one
whose smaller t-statistic of the two is largest. It replaces the recipe only if it beats plain
PCL there beyond the paired 95% interval on both kNN and NMI.
"""

from configs import small_images
from configs.studies import recipe_candidates

_BALANCED = {'clustering.levels': 'balanced'}
_HIERARCHICAL = {'clustering.levels': 'hierarchical'}


def get_study():
  """recipe_candidates.py's base, settings and seeds (its `plain` cells are these)."""
  study = recipe_candidates.get_study()
  study['variants'] = {
      'plain': {},
      'small_images': dict(small_images.RECIPE),
      'balanced': dict(_BALANCED),
      'small_images_balanced': {**small_images.RECIPE, **_BALANCED},
      'hierarchical': dict(_HIERARCHICAL),
      'small_images_hierarchical': {**small_images.RECIPE, **_HIERARCHICAL},
  }
  return study
