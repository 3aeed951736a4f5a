r"""mini-ImageNet with r=1024 negatives (the notes' earlier setting).

  python -m pcl_jax.main --config=configs/mini_imagenet_r1024.py --workdir=runs/mini_r1024 \
      --config.data.root=/data/mini-imagenet

The queue is filled one batch at a time, so r must be a multiple of the batch: 1024 is not a
multiple of 96, so this runs at batch 64 (as the notes did with r=1024). Compare it with
mini_imagenet_batch64.py (r=640, batch 64), which differs only in r.

Splits as mini_imagenet.py: pretraining on all 100 classes, evaluation on `test` (transductive,
the notes' setting); mini_imagenet_fewshot.py is the standard few-shot protocol.
"""

from configs import mini_imagenet


def get_config():
  config = mini_imagenet.get_config()
  config.train.batch_size = 64
  config.pcl.num_negatives = 1024
  return config
