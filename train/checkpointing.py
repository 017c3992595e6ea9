"""Orbax checkpoints of a training state pytree, every N steps, keeping the last K.

The run's config is written next to the checkpoints (config.json) when the run starts; a later run in
the same workdir resumes from the newest complete checkpoint only if its config is the same, otherwise
it stops with the list of changed keys. A workdir with no checkpoint yet has nothing to resume (a run
that stopped on bad input, say): its config is replaced by the new one. A run killed mid-save leaves an
incomplete step that Orbax ignores: the previous checkpoint is used.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from sdjax.errors import ConfigError
from sdjax.io import check_output_dir, record_output, write_json

from .config import config_changes

logger = logging.getLogger(__name__)


def prepare_workdir(workdir, command: str) -> Path:
    """The run's workdir: created, or an existing one of this stage; a file, an unwritable folder or a non-empty
    folder that is not a training workdir is refused (naming it) before any work."""
    workdir = Path(workdir)
    previous = check_output_dir(workdir, command, own_files=("config.json", "checkpoints"))
    if previous is None:
        record_output(workdir, command)
    return workdir


def check_or_write_config(workdir: Path, config: dict, resumable: bool) -> None:
    """Refuse to resume a checkpointed run with another config; otherwise (re)write workdir/config.json.

    resumable: the workdir has a checkpoint that this run will continue from."""
    path = Path(workdir) / "config.json"
    saved = json.loads(path.read_text()) if path.is_file() else None
    changes = config_changes(saved, config) if saved is not None else []
    if changes and resumable:
        raise ConfigError(f"{workdir} holds a run with a different config; refusing to resume it with "
                          f"this one. Changed: {'; '.join(changes)}. Use another --workdir, or the same config.")
    if changes:
        logger.warning("%s has no checkpoint yet: its earlier config is replaced (%s)", workdir, "; ".join(changes))
    if saved is None or changes:
        Path(workdir).mkdir(parents=True, exist_ok=True)
        write_json(path, config)


class Checkpointer:
    def __init__(self, workdir, every: int, keep: int):
        self.every = every
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=1,
                                               enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(Path(workdir).absolute() / "checkpoints", options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore(self, abstract_state, step: int | None = None):
        """The state saved at `step` (default: the latest), with the shardings of `abstract_state`."""
        step = self.latest_step() if step is None else step
        target = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, abstract_state)
        return self.manager.restore(step, args=ocp.args.StandardRestore(target))

    def maybe_save(self, step: int, state, force: bool = False) -> bool:
        if not force and (self.every <= 0 or step % self.every):
            return False
        if self.latest_step() == step:
            return False
        self.manager.save(step, args=ocp.args.StandardSave(state), force=True)
        return True

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()
