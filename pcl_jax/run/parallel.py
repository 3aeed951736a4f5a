"""Devices and hosts: the data-parallel mesh, batch sharding, and host<->device collectives.

This module owns how arrays are laid out over devices (one mesh axis, `data`: the batch is split,
everything else is replicated) and how processes of a multi-host run meet (jax.distributed).
It never computes a loss or reads data. The same code serves 1 CPU, N fake CPU devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=8`), one or many GPUs, and TPU slices.
"""

from typing import Optional

import jax
from jax.experimental import multihost_utils
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pcl_jax.configuration import UserError

DATA_AXIS = 'data'


def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None) -> None:
  """Joins a multi-host run. With no arguments JAX detects the cluster (SLURM, TPU, ...).

  Does nothing for a single process without a detectable cluster environment.
  """
  if coordinator_address is None and num_processes in (None, 1):
    try:
      jax.distributed.initialize()
    except (ValueError, RuntimeError):
      pass  # no cluster environment: a single-process run
    return
  # CPU devices of different processes exchange collectives over gloo (GPUs/TPUs use their own
  # interconnect; the setting only concerns the CPU client). Must precede backend start-up, so
  # no jax.default_backend() here.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)


def data_mesh() -> Mesh:
  """A 1-D mesh over every device of every process, axis `data`."""
  return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over `data`."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def check_batch_divides(batch_size: int, setting: str = 'train.batch_size') -> None:
  """The global batch must split evenly over devices and processes."""
  devices, processes = jax.device_count(), jax.process_count()
  if batch_size % devices:
    raise UserError(
        f'{setting}={batch_size} is not divisible by the {devices} devices; use a multiple of '
        f'{devices}')
  if batch_size % processes:
    raise UserError(
        f'{setting}={batch_size} is not divisible by the {processes} processes')


def global_batch(local_batch: dict, sharding: NamedSharding) -> dict:
  """Assembles each process's slice of the batch into one global, batch-sharded jax.Array."""
  return {name: jax.make_array_from_process_local_data(sharding, np.asarray(value))
          for name, value in local_batch.items()}


def to_host(x) -> np.ndarray:
  """The whole (possibly multi-host sharded) array on this host, as numpy."""
  if jax.process_count() > 1 and isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def replicate(tree, mesh: Mesh):
  """Every leaf whole on every device of `mesh` (an all-gather of sharded leaves)."""
  return jax.jit(lambda t: t, out_shardings=replicated(mesh))(tree)


def broadcast_from_process0(tree):
  """Process 0's values on every process (e.g. faiss clustering run on process 0 only)."""
  if jax.process_count() == 1:
    return tree
  return multihost_utils.broadcast_one_to_all(tree)


def barrier(name: str) -> None:
  """Waits until every process reaches this point (nothing to wait for with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def is_main_process() -> bool:
  """Only process 0 writes logs, metrics and results (Orbax saves from all)."""
  return jax.process_index() == 0
