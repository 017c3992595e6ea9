"""Several processes, one JAX run: `initialize` before any JAX computation, then every process runs the same
command. On a TPU pod slice (or under SLURM / Open MPI) JAX finds its peers itself (`auto=True`, the
`--distributed` flag); elsewhere, name the coordinator (process 0's host and a free port), the number of
processes and this process's index (`--coordinator`, `--num-processes`, `--process-id`).

What runs over several processes, and how:
- `sdjax trajectories`: batch b is done by process b % process_count on its own devices (its local mesh);
  each process writes its own shards; process 0 merges one manifest (sdjax.trajectories).
- `sdjax train STAGE`: one global mesh over every process's devices; each process feeds its slice of the same
  global batch; orbax saves and restores the replicated state from all processes; process 0 writes the logs.
"""

from __future__ import annotations

import numpy as np

from .errors import InputError


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               auto: bool = False) -> bool:
    """`jax.distributed.initialize`, once; returns whether this is a multi-process run. Nothing given and not
    `auto`: a one-process run, nothing is done."""
    import jax

    given = [coordinator is not None, num_processes is not None, process_id is not None]
    if not any(given) and not auto:
        return False
    if any(given) and not all(given):
        raise InputError("--coordinator, --num-processes and --process-id go together (or --distributed alone, "
                         "on a TPU pod slice or a cluster JAX detects)")
    if all(given):
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise InputError(f"--process-id must be in [0, {num_processes}), got {process_id}")
        if ":" not in coordinator:
            raise InputError(f"--coordinator must be HOST:PORT (process 0's address), got {coordinator!r}")
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
    else:
        jax.distributed.initialize()
    return jax.process_count() > 1


def local_mesh(axis: str = "batch"):
    """A 1-D mesh over this process's own devices (for work a process does on its own)."""
    import jax
    from jax.sharding import Mesh

    return Mesh(np.array(jax.local_devices()), (axis,))
