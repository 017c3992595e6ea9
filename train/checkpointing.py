"""Orbax checkpoints of a training state pytree, every N steps, keeping the last K.

The run's config is written next to the checkpoints (config.json) when the run starts; a later run in
the same workdir resumes from the newest complete checkpoint only if its config is the same, otherwise
it stops with the list of changed keys. A run killed mid-save leaves an incomplete step that Orbax
ignores: the previous checkpoint is used.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from sdjax.errors import ConfigError

from .config import config_changes

logger = logging.getLogger(__name__)


def check_or_write_config(workdir: Path, config: dict) -> None:
    path = Path(workdir) / "config.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        changes = config_changes(saved, config)
        if changes:
            raise ConfigError(f"{workdir} holds a run with a different config; refusing to resume it with "
                              f"this one. Changed: {'; '.join(changes)}. Use another --workdir, or the same config.")
    else:
        Path(workdir).mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(config, indent=2) + "\n")


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
