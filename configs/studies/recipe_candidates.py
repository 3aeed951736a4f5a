r"""Candidates for configs/small_images.py's RECIPE, each against plain PCL over 5 seeds.

  python -m pcl_jax.study --study=configs/studies/recipe_candidates.py \
      --workdir=/tmp/study_recipe --config.data.root=/tmp/dev_patches

Run in the same workdir as configs/studies/recipe.py, `plain` and `small_images` are that
study's cells (reused, not retrained). The candidates were fixed before any of them ran (the
two `attract` ones after the first four had finished, when none of those had moved NMI), each
for a reason independent of the development pictures:
  small_images            masked same-cluster negatives + proto_weight 0.5 (the switches that
                          raised kNN and lowered nothing alone, configs/studies/remedies.py);
  with_smoothing          ... + ProtoNCE label smoothing (pcl.smoothing_cap=0.2), the one switch
                          whose downstream gain alone was significant (5-shot);
  coarse_mask             ... masking at the coarsest active level (pcl.mask_level): its clusters
                          hold more of a class, so more of InfoNCE's false negatives leave;
  coarse_mask_smoothing   both;
  attract                 the same keys as extra positives instead of dropped negatives
                          (pcl.attract_same_cluster, false-negative attraction, Huynh et al.
                          2022): pulls a cluster's members together, which the clustering
                          metrics reward, where the mask only stops pushing them apart;
  attract_coarse          ... by the coarsest level's clusters.
docs/remedies.md has what each measured and which became the recipe.
"""

_MASKED_HALF_PROTO = {'pcl.mask_same_cluster_negatives': True, 'pcl.proto_weight': 0.5}


def get_study():
  return {
      'config': 'configs/small_images_plain.py',
      'overrides': {'eval.val_every': 3},
      'variants': {
          'plain': {},
          'small_images': dict(_MASKED_HALF_PROTO),
          'with_smoothing': {**_MASKED_HALF_PROTO, 'pcl.smoothing_cap': 0.2},
          'coarse_mask': {**_MASKED_HALF_PROTO, 'pcl.mask_level': 'coarsest'},
          'coarse_mask_smoothing': {**_MASKED_HALF_PROTO, 'pcl.mask_level': 'coarsest',
                                    'pcl.smoothing_cap': 0.2},
          'attract': {'pcl.attract_same_cluster': True, 'pcl.proto_weight': 0.5},
          'attract_coarse': {'pcl.attract_same_cluster': True, 'pcl.proto_weight': 0.5,
                             'pcl.mask_level': 'coarsest'},
      },
      'baseline': 'plain',
      'seeds': [0, 1, 2, 3, 4],
  }
