r"""Digits, coarse->fine (compare configs/digits.py, fine->coarse): the schedule pair on CPU.

  python -m pcl_jax.main --config=configs/digits.py --workdir=runs/digits_desc
  python -m pcl_jax.main --config=configs/digits_ascending.py --workdir=runs/digits_asc
  python -m pcl_jax.plot runs/digits_desc runs/digits_asc --out digits_schedules.png
"""

from configs import digits


def get_config():
  config = digits.get_config()
  config.schedule.all_clusters = '5,10,20,30,50,80,120'
  return config
