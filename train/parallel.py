"""Data parallelism over every device: one 1-D mesh, the batch split along "data", the state replicated.

Test on CPU with XLA_FLAGS=--xla_force_host_platform_device_count=8 (set before jax is imported).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def make_mesh() -> Mesh:
    return Mesh(np.array(jax.devices()), ("data",))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P("data"))


def replicate(tree, mesh: Mesh):
    return jax.device_put(tree, replicated(mesh))


def shard_batch(tree, mesh: Mesh):
    """Host arrays [B, ...] -> global arrays split over the mesh's devices along the batch axis."""
    return jax.device_put(tree, batch_sharded(mesh))


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
    from sdjax.errors import ConfigError

    if batch_size % mesh.size:
        raise ConfigError(f"batch_size {batch_size} must be divisible by the number of devices ({mesh.size})")


def is_primary() -> bool:
    """Process 0 of a multi-process run (the one that writes logs, summaries and exports); True in one process."""
    return jax.process_index() == 0


def sync(name: str) -> None:
    """Wait until every process reaches this point (a no-op in one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
