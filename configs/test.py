r"""Tiny configuration for the test suite: seconds per epoch on one CPU core.

  python -m pcl_jax.main --config=configs/test.py --workdir=/tmp/pcl_test
"""

from configs import digits


def get_config():
  """Returns the tiny test configuration (digits, 16 px, narrow Conv4)."""
  config = digits.get_config()
  config.seed = 0
  config.data.image_size = 16
  config.data.num_workers = 0
  config.model.width = 8
  config.model.dim = 16
  config.train.epochs = 2
  config.train.batch_size = 32
  config.train.log_every_steps = 5
  config.train.shuffle_bn_groups = 2
  config.train.steps_per_epoch = 6
  config.pcl.num_negatives = 64
  config.pcl.warmup_epochs = 1
  config.schedule.all_clusters = '40,20,10,5'
  config.schedule.num_levels = 2
  config.eval.fewshot_episodes = 50
  config.eval.val_every = 0
  config.eval.kmeans_runs = 2
  # Off for the suite's speed (a compilation per feature shape); tests/test_cluster_head.py
  # turns it on.
  config.eval.cluster_head = False
  config.checkpoint.every_epochs = 1
  return config
