r"""mini-ImageNet with MoCo v2 augmentation (aug_plus on; compare mini_imagenet.py, off).

  python -m pcl_jax.main --config=configs/mini_imagenet_aug_plus.py --workdir=runs/mini_augplus \
      --config.data.root=/data/mini-imagenet

Splits as mini_imagenet.py: pretraining on all 100 classes, evaluation on `test` (transductive,
the notes' setting); mini_imagenet_fewshot.py is the standard few-shot protocol.
"""

from configs import mini_imagenet


def get_config():
  config = mini_imagenet.get_config()
  config.data.aug_plus = True
  return config
