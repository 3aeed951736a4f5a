r"""Plain PCL with its coarsest level at the class count the features suggest, 5 seeds.

  python -m pcl_jax.study --study=configs/studies/class_count.py --workdir=/tmp/study_class_count \
      --config.data.root=/tmp/dev_patches

An exploratory study of the one PCL change docs/remedies.md leaves untried: a cluster list that
ends near the class count (the notes' lists end at k = 2-10). `last_k_10` replaces plain PCL's
coarsest level, 20, by 10: the k that the silhouette of k-means picks, without labels, on plain
PCL's trained features of both image sets (benchmarks/cluster_count_estimate.py; 8-12 in six runs
of six). It is also their true class count, so a gain here would have said the avenue is worth building
(the E-step estimating the k itself), not that a fixed 10 is a recipe for unseen data. There was
none on either image set (docs/remedies.md, "Open").
"""

from configs.studies import recipe_candidates


def get_study():
  """recipe_candidates.py's base, settings and seeds (its `plain` cells are these), two variants."""
  study = recipe_candidates.get_study()
  study['variants'] = {'plain': {}, 'last_k_10': {'schedule.all_clusters': '100,50,10'}}
  return study
