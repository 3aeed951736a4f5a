"""pcl_jax: Prototypical Contrastive Learning in JAX/Flax (see DESIGN.md for the algorithm)."""
