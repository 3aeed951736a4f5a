"""`python -m pcl_jax.plot WORKDIR [WORKDIR ...]`: curves of runs (`pcl_jax.study.plot`)."""

import sys

from pcl_jax.study import plot

if __name__ == '__main__':
  sys.exit(plot.main())
