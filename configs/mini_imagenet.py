r"""mini-ImageNet: the researcher's best settings (notes of Dec 5; DESIGN.md section 1).

  python -m pcl_jax.main --config=configs/mini_imagenet.py --workdir=/tmp/pcl_mini \
      --config.data.root=/data/mini-imagenet

ResNet-18 at 84 px, batch 96, lr 0.08 cosine, r=640, m=0.999, T=0.2, MoCo v1 augmentation,
descending (fine->coarse) cluster list with a window of 3 levels.
"""

from configs import default


def get_config():
  """Returns the mini-ImageNet configuration."""
  config = default.get_config()
  config.data.name = 'mini_imagenet'
  config.data.image_size = 84
  config.data.train_split = 'train'
  config.data.eval_split = 'test'
  config.data.aug_plus = False
  config.data.num_workers = 8
  config.model.arch = 'resnet18'
  config.train.epochs = 200
  config.train.batch_size = 96
  config.optim.lr = 0.08
  config.optim.cos = True
  config.pcl.temperature = 0.2
  config.pcl.moco_m = 0.999
  config.pcl.num_negatives = 640
  config.schedule.all_clusters = '3200,2400,1600,800,400,200,100,50,25,20,10,5,2'
  config.schedule.num_levels = 3
  return config
