r"""mini-ImageNet at lr 0.03 (the notes' earlier setting; compare mini_imagenet.py at 0.08).

  python -m pcl_jax.main --config=configs/mini_imagenet_lr003.py --workdir=runs/mini_lr003 \
      --config.data.root=/data/mini-imagenet

Splits as mini_imagenet.py: pretraining on all 100 classes, evaluation on `test` (transductive,
the notes' setting); mini_imagenet_fewshot.py is the standard few-shot protocol.
"""

from configs import mini_imagenet


def get_config():
  config = mini_imagenet.get_config()
  config.optim.lr = 0.03
  return config
