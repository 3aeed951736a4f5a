r"""mini-ImageNet, the standard few-shot protocol: pretraining on the 64 `train` classes only,
few-shot evaluation on the 20 `test` classes it never saw (compare mini_imagenet.py, which
pretrains on all 100 classes as the research notes did: transductive).

  python -m pcl_jax.main --config=configs/mini_imagenet_fewshot.py --workdir=/tmp/pcl_mini_fs \
      --config.data.root=/data/mini-imagenet

The settings are mini_imagenet.py's (ResNet-18 at 84 px, batch 96, lr 0.08 cosine, r=640, the
descending cluster list) but for the splits: 38,400 training images, so the cluster list's
largest k (3200) still leaves 12 images a cluster. `--mode=eval` scores `test`, whose classes
are not in `train`: kNN and the linear probe on within-test halves, few-shot episodes and
clustering quality on `test`; numbers comparable with published ones. `data.val_split=val` (16
further unseen classes) is what `--config.eval.val_every=N` monitors.
"""

from configs import mini_imagenet


def get_config():
  """Returns the mini-ImageNet configuration of the standard few-shot protocol."""
  config = mini_imagenet.get_config()
  config.data.train_split = 'train'
  config.data.eval_split = 'test'
  config.data.val_split = 'val'
  return config
