"""`python -m pcl_jax.study`: runs a study file's cells and writes its report (see `command`)."""

from absl import app

from pcl_jax.kernels import host_memory
from pcl_jax.study import command

if __name__ == '__main__':
  # Before anything starts a thread that allocates (see kernels/host_memory's docstring).
  host_memory.tune_malloc()
  command.define_flags()
  app.run(command.main, flags_parser=command.parse_flags)
