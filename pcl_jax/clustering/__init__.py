"""The E-step's clustering: k-means backends, hierarchical levels and cluster concentration.

`backend` (`kmeans` and `resolve_backend`, over `faiss_kmeans` and `jax_kmeans`) and `levels`
(`cluster_levels`, `concentration`). The names below are the package's public interface
(DESIGN.md section 3).
"""

from pcl_jax.clustering.backend import kmeans
from pcl_jax.clustering.backend import resolve_backend
from pcl_jax.clustering.levels import cluster_levels
from pcl_jax.clustering.levels import concentration

__all__ = ['kmeans', 'resolve_backend', 'cluster_levels', 'concentration']
