"""The run's infrastructure around the algorithm: the command line (`cli`), checkpoints
(`checkpoint`), resuming (`resume`), the run directory's files (`files`), stop requests
(`stop`) and devices and hosts (`parallel`). None of it computes a loss or a feature; the
algorithm's modules use it only to save, restore and place arrays."""
