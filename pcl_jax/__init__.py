"""Prototypical Contrastive Learning in JAX/Flax: docs/architecture.md maps the modules.

The algorithm and the run sit at the top level (main, configuration, models, state, losses,
cluster_schedule, clustering/, step, features, train, resume, stop, checkpoint, run_files,
parallel, plot); `data/` turns files into batches, `evaluation/` scores features, and
`kernels/` holds the optional CPU kernels. Importing the package has no side effects.
"""
