r"""The HCSC screen's pick against plain PCL on 23 new seeds (5-27).

  python -m pcl_jax.study --study=configs/studies/hcsc_confirmation.py \
      --workdir=/tmp/study_hcsc_confirmation --config.data.root=/tmp/dev_patches

configs/studies/hcsc.py screened two candidates on seeds 0-4 by the rule written there: both had
kNN and NMI differences above 0, and `selection` (plain PCL with HCSC's instance selection) had
the larger smaller t-statistic of the two (NMI t = 1.00; `hcsc`: kNN t = 0.66). This file was
written, and committed, before any of its cells ran. Its `plain` cells are
configs/studies/recipe_confirmation.py's (linked into the workdir, reused). The candidate
replaces the recipe only if it beats plain PCL here beyond the paired 95% interval on both kNN
and NMI.
"""

from configs.studies import hcsc
from configs.studies import recipe_confirmation


def get_study():
  return recipe_confirmation.on_new_seeds(hcsc.get_study(), 'selection')
