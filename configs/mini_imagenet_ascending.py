r"""mini-ImageNet, coarse->fine: the ascending cluster list of the notes (compare mini_imagenet.py).

  python -m pcl_jax.main --config=configs/mini_imagenet_ascending.py --workdir=runs/mini_asc \
      --config.data.root=/data/mini-imagenet

Splits as mini_imagenet.py: pretraining on all 100 classes, evaluation on `test` (transductive,
the notes' setting); mini_imagenet_fewshot.py is the standard few-shot protocol.
"""

from configs import mini_imagenet


def get_config():
  config = mini_imagenet.get_config()
  config.schedule.all_clusters = '2,5,10,20,33,50,100,200,400,800,1600,2400,3200'
  return config
