r"""The recipe for small image sets: plain PCL's budget, with the changes measured to help.

  python -m pcl_jax.main --config=configs/small_images.py --workdir=/tmp/pcl_small \
      --config.data.root=/data/my_images

Same budget as configs/small_images_plain.py (PCL as published, set like the reference's run):
Conv4 width 64 at 32 px, 30 epochs, batch 64. RECIPE lists what it changes; each change was
measured alone and together against plain PCL, 3 seeds, paired (configs/studies/remedies.py,
docs/studies/remedies.md).
"""

from configs import small_images_plain

# Dotted config fields -> values, over configs/small_images_plain.py.
RECIPE = {
    'pcl.mask_same_cluster_negatives': True,
}


def get_config():
  """Returns the small-image recipe."""
  config = small_images_plain.get_config()
  for dotted, value in RECIPE.items():
    section, name = dotted.split('.')
    config[section][name] = value
  return config
