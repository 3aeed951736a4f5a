r"""Candidates for configs/small_images.py's RECIPE, each against plain PCL over 5 seeds.

  python -m pcl_jax.study --study=configs/studies/recipe_candidates.py \
      --workdir=/tmp/study_recipe --config.data.root=/tmp/dev_patches

Run in the same workdir as configs/studies/recipe.py, `plain` and `small_images` are that
study's cells (reused, not retrained). The candidates were fixed before any of them ran (the
two `attract` ones after the first four had finished, when none of those had moved NMI), each
for a reason independent of the development pictures:
  small_images            masked same-cluster negatives + proto_weight 0.5 (the changes that
                          raised kNN and lowered nothing alone, configs/studies/remedies.py);
  with_smoothing          ... + ProtoNCE label smoothing (pcl.smoothing_cap=0.2), the one change
                          whose downstream gain alone was significant (5-shot);
  coarse_mask             ... masking at the coarsest active level (pcl.masked.level): its clusters
                          hold more of a class, so more of InfoNCE's false negatives leave;
  coarse_mask_smoothing   both;
  attract                 the same keys as extra positives instead of dropped negatives
                          (pcl.instance_loss='attract', false-negative attraction, Huynh et al.
                          2022): pulls a cluster's members together, which the clustering
                          metrics reward, where the mask only stops pushing them apart;
  attract_coarse          ... by the coarsest level's clusters.
The last three were added when none of the above had beaten plain PCL on both kNN and NMI:
  attract_half            attraction with the own key keeping half of InfoNCE's target
                          (pcl.attract.share=0.5): uniform attraction gives the own key
                          1 / (n + 1) of it, so instance discrimination, which kNN rests on,
                          fades as clusters grow;
  attract_coarse_half     ... by the coarsest level: its attraction moved NMI and cost kNN;
  attract_graded          each key weighted by the fraction of levels that put it in the
                          query's cluster (pcl.attract.level=graded): keys sharing fine clusters
                          too are likelier the query's class, and pull harder.
The rule that picks the recipe among them (the second round's, written here with its tie-break
when attract_half had finished and the last two had not): the candidate that beats plain PCL
beyond the paired 95% interval on both kNN and NMI, the one whose larger p-value of the two is
smallest if several do; if none does, the one nearest that target.
docs/remedies.md has what each measured and which became the recipe.
"""

_MASKED_HALF_PROTO = {'pcl.instance_loss': 'masked', 'pcl.proto_weight': 0.5}
_ATTRACT_HALF_PROTO = {'pcl.instance_loss': 'attract', 'pcl.proto_weight': 0.5}


def get_study():
  return {
      'config': 'configs/small_images_plain.py',
      'overrides': {'eval.val_every': 3},
      'variants': {
          'plain': {},
          'small_images': dict(_MASKED_HALF_PROTO),
          'with_smoothing': {**_MASKED_HALF_PROTO, 'pcl.smoothing_cap': 0.2},
          'coarse_mask': {**_MASKED_HALF_PROTO, 'pcl.masked.level': 'coarsest'},
          'coarse_mask_smoothing': {**_MASKED_HALF_PROTO, 'pcl.masked.level': 'coarsest',
                                    'pcl.smoothing_cap': 0.2},
          'attract': dict(_ATTRACT_HALF_PROTO),
          'attract_coarse': {**_ATTRACT_HALF_PROTO, 'pcl.attract.level': 'coarsest'},
          'attract_half': {**_ATTRACT_HALF_PROTO, 'pcl.attract.share': 0.5},
          'attract_coarse_half': {**_ATTRACT_HALF_PROTO, 'pcl.attract.share': 0.5,
                                  'pcl.attract.level': 'coarsest'},
          'attract_graded': {**_ATTRACT_HALF_PROTO, 'pcl.attract.level': 'graded'},
      },
      'baseline': 'plain',
      'seeds': [0, 1, 2, 3, 4],
  }
