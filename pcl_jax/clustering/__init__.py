"""The E-step's clustering: k-means backends, hierarchical levels and cluster concentration.

`backend` (`kmeans` and `resolve_backend`, over `faiss_kmeans` and `jax_kmeans`) and `levels`
(`cluster_levels`, `concentration`). The names below are the package's public interface
(DESIGN.md section 3).
"""

from pcl_jax.clustering.backend import kmeans
from pcl_jax.clustering.backend import resolve_backend
from pcl_jax.clustering import levels
from pcl_jax.clustering.levels import cluster_levels
from pcl_jax.clustering.levels import concentration
from pcl_jax.configuration import UserError

__all__ = ['kmeans', 'resolve_backend', 'cluster_levels', 'concentration', 'check_settings']


def check_settings(config) -> str:
  """The `clustering` settings' checks that ask the machine: the backend can run here (faiss
  installed; faiss-gpu only with a GPU), and balanced clusters only on flat levels.

  Returns:
    The resolved backend ('faiss-gpu', 'faiss-cpu' or 'jax').
  Raises:
    UserError: naming the setting and the fix.
  """
  try:
    backend = resolve_backend(config.clustering.backend)
    levels.check_balanced(config.clustering.balanced, config.clustering.hierarchical)
  except ValueError as error:
    raise UserError(str(error)) from error
  return backend
