r"""HCSC's instance selection, alone and with HCSC's hierarchical prototypes, against plain PCL:
a 5-seed screen.

  python -m pcl_jax.study --study=configs/studies/hcsc.py \
      --workdir=/tmp/study_hcsc --config.data.root=/tmp/dev_patches

`plain` and `small_images` are the cells `plain` and `attract_half` (the recipe) of
configs/studies/recipe_candidates.py: linked into the workdir, they are reused, not retrained.
Hierarchical Contrastive Selective Coding (Guo et al., CVPR 2022) adds two things to PCL:
hierarchical prototypes (screened alone in configs/studies/e_step.py) and the selection of
InfoNCE's negatives (pcl.instance_loss='selected'): at each level a queue key stays a negative with
probability 1 - p(key in the query's prototype), so keys likely of the query's cluster are
mostly dropped, and InfoNCE is averaged over the levels. It is the soft, per-level form of the
same-cluster mask, read from the key's embedding instead of its sample's last assignment. Two
candidates, fixed with the rule before either ran:
  selection   plain PCL with HCSC's instance selection;
  hcsc        ... with hierarchical prototypes too (HCSC without its prototype selection).
The rule is configs/studies/e_step.py's: a candidate whose kNN and NMI differences against plain
PCL are both above 0 goes on to 23 new seeds (seeds 5-27), the one with the largest smaller
t-statistic of the two if both do, and replaces the recipe only if it beats plain PCL there
beyond the paired 95% interval on both kNN and NMI.
"""

from configs import small_images
from configs.studies import recipe_candidates

_SELECTION = {'pcl.instance_loss': 'selected'}


def get_study():
  """recipe_candidates.py's base, settings and seeds (its `plain` cells are these)."""
  study = recipe_candidates.get_study()
  study['variants'] = {
      'plain': {},
      'small_images': dict(small_images.RECIPE),
      'selection': dict(_SELECTION),
      'hcsc': {**_SELECTION, 'clustering.levels': 'hierarchical'},
  }
  return study
