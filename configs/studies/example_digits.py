r"""Example study: does a higher learning rate help on digits? 2 variants x 3 seeds, minutes on a CPU.

  python -m pcl_jax.study --study=configs/studies/example_digits.py --workdir=/tmp/study_digits

A study file defines get_study(); docs/studies.md describes every key and the report.
"""


def get_study():
  return {
      'config': 'configs/digits.py',
      # Every cell: 10 epochs with the over-fitting monitor every epoch.
      'overrides': {'train.epochs': 10, 'eval.val_every': 1, 'checkpoint.every_epochs': 5},
      'variants': {
          'base': {},
          'lr016': {'optim.lr': 0.16},
      },
      'baseline': 'base',
      'seeds': [0, 1, 2],
  }
