"""The E-step's clustering: k-means backends, flat, hierarchical or balanced levels, concentration.

`backend` (`kmeans` and `resolve_backend`, over `faiss_kmeans` and `jax_kmeans`) and `levels`
(`cluster_levels`, its settings from a run config `level_settings`, `concentration`);
`padded_rows` (`clustering.pad_k`) and
`kmeans_compilations` from `jax_kmeans`. The names below are the package's public interface
(DESIGN.md section 3).
"""

from pcl_jax.clustering.backend import kmeans
from pcl_jax.clustering.backend import resolve_backend
from pcl_jax.clustering.jax_kmeans import compilations as kmeans_compilations
from pcl_jax.clustering.jax_kmeans import padded_rows
from pcl_jax.clustering.levels import cluster_levels
from pcl_jax.clustering.levels import concentration
from pcl_jax.clustering.levels import config_settings as level_settings
from pcl_jax.configuration import UserError

__all__ = ['kmeans', 'resolve_backend', 'cluster_levels', 'level_settings', 'concentration',
           'check_settings', 'kmeans_compilations', 'padded_rows']


def check_settings(config) -> str:
  """The `clustering` settings' check that asks the machine: the backend can run here (faiss
  installed; faiss-gpu only with a GPU).

  Returns:
    The resolved backend ('faiss-gpu', 'faiss-cpu' or 'jax').
  Raises:
    UserError: naming the setting and the fix.
  """
  try:
    return resolve_backend(config.clustering.backend)
  except ValueError as error:
    raise UserError(str(error)) from error
