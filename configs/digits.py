r"""Digits: sklearn's bundled 8x8 digits (1,797 images), the embedded default. CPU, minutes.

  python -m pcl_jax.main --config=configs/digits.py --workdir=/tmp/pcl_digits

Conv4 at 32 px; 10 classes, so the cluster list runs fine->coarse around 10.
"""

from configs import default


def get_config():
  """Returns the digits configuration."""
  config = default.get_config()
  config.data.name = 'digits'
  config.data.image_size = 32
  config.data.aug_plus = False
  config.data.num_workers = 1
  config.model.arch = 'conv4'
  config.model.width = 32
  config.train.epochs = 20
  config.train.batch_size = 64
  config.train.log_every_steps = 10
  config.optim.lr = 0.08
  config.pcl.num_negatives = 256
  config.pcl.moco_m = 0.99  # 320 steps in all: 0.999 would leave the key encoder near its init
  config.pcl.warmup_epochs = 3
  config.schedule.all_clusters = '120,80,50,30,20,10,5'
  config.schedule.num_levels = 3
  config.schedule.window = 3
  config.schedule.patience = 6
  config.eval.fewshot_episodes = 500
  config.eval.val_every = 5
  config.checkpoint.every_epochs = 5
  return config
