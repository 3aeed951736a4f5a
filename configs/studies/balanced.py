r"""Balanced cluster assignments (clustering.balanced) against plain PCL, 5 seeds, a screen.

  python -m pcl_jax.study --study=configs/studies/balanced.py \
      --workdir=/tmp/study_balanced --config.data.root=/tmp/dev_patches

`plain` and `small_images` are the cells `plain` and `attract_half` (the recipe) of
configs/studies/recipe_candidates.py: linked into the workdir, they are reused, not retrained. The loss switches measured so far change what the encoder
is pulled to, never the clusters themselves; none moved NMI on seeds no choice saw
(docs/remedies.md). This screen changes the E-step: k-means' clusters on small image sets range
from singletons to several times the mean size, and ProtoNCE pulls every member of a crowded
cluster to one prototype. Equipartition (SeLa, SwAV: Sinkhorn-Knopp, SwAV's epsilon 0.05 and 3
iterations, pcl_jax/clustering/balanced.py) gives each cluster an equal share. Two candidates,
fixed before either ran:
  balanced                plain PCL with balanced assignments at every level;
  small_images_balanced   the recipe (configs/small_images.py) with them.
The rule, also fixed before they ran: five seeds cannot resolve an NMI change below ~0.015
(paired sd ~0.011), so this is a screen, not the test. A candidate whose kNN and NMI
differences against plain PCL are both above 0 goes on to the 23 new seeds of
configs/studies/recipe_confirmation.py (configs/studies/balanced_confirmation.py); if both do,
the one whose smaller t-statistic of the two is larger. It replaces the recipe only if it beats
plain PCL there beyond the paired 95% interval on both kNN and NMI.
"""

from configs import small_images

_BALANCED = {'clustering.balanced': True}


def get_study():
  return {
      'config': 'configs/small_images_plain.py',
      'overrides': {'eval.val_every': 3},
      'variants': {
          'plain': {},
          'small_images': dict(small_images.RECIPE),
          'balanced': dict(_BALANCED),
          'small_images_balanced': {**small_images.RECIPE, **_BALANCED},
      },
      'baseline': 'plain',
      'seeds': [0, 1, 2, 3, 4],
  }
