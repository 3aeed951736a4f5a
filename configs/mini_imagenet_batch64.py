r"""mini-ImageNet at batch 64 (the notes' earlier setting; compare mini_imagenet.py at 96).

  python -m pcl_jax.main --config=configs/mini_imagenet_batch64.py --workdir=runs/mini_b64 \
      --config.data.root=/data/mini-imagenet

Splits as mini_imagenet.py: pretraining on all 100 classes, evaluation on `test` (transductive,
the notes' setting); mini_imagenet_fewshot.py is the standard few-shot protocol.
"""

from configs import mini_imagenet


def get_config():
  config = mini_imagenet.get_config()
  config.train.batch_size = 64  # r=640 is a multiple of 64 too
  return config
