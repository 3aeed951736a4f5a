r"""mini-ImageNet at batch 64 (the notes' earlier setting; compare mini_imagenet.py at 96).

  python -m pcl_jax.main --config=configs/mini_imagenet_batch64.py --workdir=runs/mini_b64 \
      --config.data.root=/data/mini-imagenet
"""

from configs import mini_imagenet


def get_config():
  config = mini_imagenet.get_config()
  config.train.batch_size = 64  # r=640 is a multiple of 64 too
  return config
