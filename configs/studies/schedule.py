r"""The notes' cluster-count schedules against plain PCL on a small image folder (10 classes).

  python -m pcl_jax.study --study=configs/studies/schedule.py --workdir=/tmp/study_schedule \
      --config.data.root=/tmp/dev_patches

Variants (the notes' lists scaled to 10 classes as configs/digits.py does; see DESIGN.md
section 1 for the schedule):
  plain       PCL as published: clusters 100,50,20 on three fixed levels, no label smoothing,
              L2 k-means (configs/small_images_plain.py, the reference's run);
  descending  the notes' fine->coarse list 120..5, three levels at a time, moving on on plateaus
              of acc_inst (window 3, at most 6 epochs a stage), label smoothing (cap 0.2) and
              spherical k-means;
  ascending   the same list coarse->fine;
  fixed       the descending list moving every 5 epochs (schedule.mode=fixed).
Every cell checks the validation kNN every 3 epochs (best_val_knn, overfit_gap).
"""

_NOTES = {'pcl.smoothing_cap': 0.2, 'clustering.spherical': True, 'schedule.window': 3,
          'schedule.patience': 6}
_DESCENDING = '120,80,50,30,20,10,5'
_ASCENDING = '5,10,20,30,50,80,120'


def get_study():
  return {
      'config': 'configs/small_images_plain.py',
      'overrides': {'eval.val_every': 3},
      'variants': {
          'plain': {},
          'descending': dict(_NOTES, **{'schedule.all_clusters': _DESCENDING,
                                        'schedule.mode': 'plateau'}),
          'ascending': dict(_NOTES, **{'schedule.all_clusters': _ASCENDING,
                                       'schedule.mode': 'plateau'}),
          'fixed': dict(_NOTES, **{'schedule.all_clusters': _DESCENDING,
                                   'schedule.mode': 'fixed', 'schedule.every': 5}),
      },
      'baseline': 'plain',
      'seeds': [0, 1, 2],
  }
