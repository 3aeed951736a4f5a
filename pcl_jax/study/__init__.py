"""The study tools beside the algorithm: grids of variants x seeds run as ordinary run
directories (`runner`, `python -m pcl_jax.study`), their reports with intervals and paired tests
(`report`), and curves of runs (`plot`, `python -m pcl_jax.plot`). Nothing in the algorithm's
modules imports this package."""
