r"""PCL's known flaws and the notes' open problems: each change alone against plain PCL.

  python -m pcl_jax.study --study=configs/studies/remedies.py --workdir=/tmp/study_remedies \
      --config.data.root=/tmp/dev_patches

Baseline `plain` is PCL as published at the reference run's budget (configs/small_images_plain.py).
Each other variant changes one thing (docs/studies.md has what each measured):
  mask_negatives     pcl.instance_loss='masked': InfoNCE drops queue keys of the query's
                     cluster (official repository's issue #8);
  attract            pcl.instance_loss='attract': ... makes them extra positives instead
                     (false-negative attraction, Huynh et al. 2022);
  proto_weight_half  pcl.proto_weight=0.5: ProtoNCE weighted half against InfoNCE;
  proto_weight_double  pcl.proto_weight=2: ... and twice;
  reference_columns  pcl.proto_columns='reference': the official code's ProtoNCE columns;
  smoothing          the notes' label smoothing of ProtoNCE (pcl.smoothing_cap=0.2);
  smooth_both        ... applied to InfoNCE too (pcl.infonce.smoothed);
  weight_decay       over-fitting: optim.weight_decay 5e-4 instead of 1e-4;
  debias             debiased InfoNCE (Chuang et al. 2020) with tau+ = 0.1
                     (pcl.instance_loss='debiased');
  momentum_099       pcl.moco_m=0.99: at 700 steps in all, m=0.999 (time constant 1000 steps)
                     leaves the key encoder, which makes the queue and the clustered features,
                     half at its random initialisation;
The report (docs/studies/remedies.md) names the settings as they were then called (table in
docs/remedies.md). Every cell checks the validation kNN every 3 epochs (best_val_knn,
overfit_gap). The recipe that
combines the ones that helped is compared with plain PCL over 5 seeds by configs/studies/recipe.py.
"""

def get_study():
  return {
      'config': 'configs/small_images_plain.py',
      'overrides': {'eval.val_every': 3},
      'variants': {
          'plain': {},
          'mask_negatives': {'pcl.instance_loss': 'masked'},
          'attract': {'pcl.instance_loss': 'attract'},
          'proto_weight_half': {'pcl.proto_weight': 0.5},
          'proto_weight_double': {'pcl.proto_weight': 2.0},
          'reference_columns': {'pcl.proto_columns': 'reference'},
          'smoothing': {'pcl.smoothing_cap': 0.2},
          'smooth_both': {'pcl.smoothing_cap': 0.2, 'pcl.infonce.smoothed': True},
          'weight_decay': {'optim.weight_decay': 5e-4},
          'debias': {'pcl.instance_loss': 'debiased', 'pcl.debiased.prior': 0.1},
          'momentum_099': {'pcl.moco_m': 0.99},
      },
      'baseline': 'plain',
      'seeds': [0, 1, 2],
  }
