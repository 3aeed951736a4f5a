"""The study tools beside the algorithm: grids of variants x seeds run as ordinary run
directories (`python -m pcl_jax.study`), their reports with intervals and paired tests, and
curves of runs (`python -m pcl_jax.plot`). One module a job: the study file's schema (`spec`),
the cells, their configs, slices and directories (`cells`), running them (`runner`), the
command line (`command`), the report (`report`), the curves (`plot`). Nothing in the
algorithm's modules imports this package."""
