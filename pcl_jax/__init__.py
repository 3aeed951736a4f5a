"""Prototypical Contrastive Learning in JAX/Flax (see README.md and ../shared/DESIGN.md)."""

from pcl_jax import host_memory

# Before jax starts its CPU threads: see host_memory's docstring for why and the measured effect.
host_memory.tune_malloc()
