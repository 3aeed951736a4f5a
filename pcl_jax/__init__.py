"""Prototypical Contrastive Learning in JAX/Flax: docs/architecture.md maps the modules.

The top level is the algorithm: `main` (the command), `train` (the epoch loop), `step` (the
M-step), `models`, `state`, `features` (the feature pass), `cluster_schedule` (the
cluster-count controller) and `configuration` (the settings' contract), with `losses/`
(InfoNCE's forms and ProtoNCE), `clustering/` (the E-step), `data/` (files to batches) and
`evaluation/` (scoring features). `run/` is the run's infrastructure (checkpoints, resume, run
files, stop requests, devices, the command line), `study/` the tools beside the algorithm
(studies, reports, plots), `kernels/` the optional CPU kernels. Importing the package has no
side effects.
"""
