"""The training loop every stage shares: restore or initialise the state, step, log, checkpoint.

A stage describes its train step as a `Step`: a pure function `fn(*static, state, batch, key) -> (state,
metrics)` and the static values it closes over (config, models, mesh). `train_step` is the one compiled
program for all of them: `jax.jit` with the Step as a static argument (hashed by value) and the state
donated, so JAX's own cache holds one program per setup; a resumed run in the same process reuses it.

Batches and random keys are functions of (seed, step), so a run resumed from a checkpoint continues
exactly the run that was interrupted.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time

import jax
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from sdjax.preemption import any_process, stop_requested

from . import parallel

logger = logging.getLogger(__name__)


def _static_key(x):
    """A hashable, value-based stand-in for a static value (configs are dataclasses of dicts and lists)."""
    if isinstance(x, (np.ndarray, jax.Array)):
        return ("array", np.asarray(x).dtype.str, np.asarray(x).shape, np.asarray(x).tobytes())
    if isinstance(x, (dict, list)):
        return json.dumps(x, sort_keys=True)
    if dataclasses.is_dataclass(x) and type(x).__hash__ is None:  # a stage's Config
        return (type(x).__name__, json.dumps(dataclasses.asdict(x), sort_keys=True))
    return x  # Flax modules, schedulers, meshes, numbers, functions: hashable by value already


class Step:
    """fn(*static, state, batch, key) as a static argument of `train_step`, equal when fn and static are."""

    def __init__(self, fn, mesh: Mesh, *static):
        self.fn, self.mesh, self.static = fn, mesh, static
        self._key = (fn, mesh, tuple(_static_key(s) for s in static))

    def __hash__(self):
        return hash(self._key)

    def __eq__(self, other):
        return isinstance(other, Step) and self._key == other._key

    def __call__(self, state, batch, key):
        return self.fn(*self.static, state, batch, key)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=1)
def train_step(step: Step, state, batch, key):
    """The compiled train step of every stage: the new state stays replicated over the step's mesh."""
    state, metrics = step(state, batch, key)
    replicated = parallel.replicated(step.mesh)
    return jax.lax.with_sharding_constraint(state, replicated), jax.lax.with_sharding_constraint(metrics, replicated)


def ema_update(ema, params, step, decay: float):
    """The exponential moving average of the weights after `step` (>= 1) updates, warmed up: the decay is
    min(decay, (1 + step) / (10 + step)), so early on the average follows the weights."""
    d = jax.numpy.minimum(decay, (1.0 + step) / (10.0 + step))
    return jax.tree_util.tree_map(lambda e, p: d * e + (1 - d) * p, ema, params)


def compile_count() -> int:
    """How many programs `train_step` has compiled in this process (JAX's cache size)."""
    return train_step._cache_size()


def restore_or_init(ckpt, init_fn, mesh):
    """(state, start step): the newest checkpoint if there is one, else `init_fn()` replicated over the mesh."""
    start = ckpt.latest_step()
    if start is None:
        return parallel.replicate(init_fn(), mesh), 0
    rep = parallel.replicated(mesh)
    abstract = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep),
                                      jax.eval_shape(init_fn))
    logger.info("resumed from step %d", start)
    return ckpt.restore(abstract, start), start


def run_steps(cfg, state, start, step: Step, make_batch, ckpt, log, *, desc, until_step=None, final_save=True,
              progress=True):
    """Steps `start` .. min(num_steps, until_step): returns (state, summary of this run).

    make_batch(step) -> the sharded batch for that step; `step` is the stage's Step (run by `train_step`).
    """
    base_key = jax.random.PRNGKey(cfg.seed)
    end = cfg.num_steps if until_step is None else min(cfg.num_steps, until_step)
    compiles_before = compile_count()
    t0, seen = time.time(), 0
    bar = tqdm(range(start, end), initial=start, total=cfg.num_steps, desc=desc,
               disable=not progress or not parallel.is_primary())
    stopped_at = None
    with stop_requested() as stop:
        for i in bar:
            state, metrics = train_step(step, state, make_batch(i), jax.random.fold_in(base_key, i))
            seen += cfg.batch_size
            if (i + 1) % cfg.log_every == 0 or i + 1 == end:
                m = {k: float(v) for k, v in metrics.items()}
                log.write(i + 1, **m)
                bar.set_postfix(loss=f"{m['loss']:.4f}")
            ckpt.maybe_save(i + 1, state)
            # SIGTERM (preemption): stop after this step, checkpointed; every process stops at the same step
            if any_process(bool(stop)) and i + 1 < end:
                stopped_at = i + 1
                break
    bar.close()
    elapsed = time.time() - t0
    if stopped_at is not None:
        end = stopped_at
        ckpt.maybe_save(end, state, force=True)
        logger.warning("stopped by SIGTERM after step %d (checkpointed); rerun the same command to resume", end)
    elif final_save:
        ckpt.maybe_save(end, state, force=True)
    ckpt.close()
    # The device count is part of what makes a run bit-reproducible: the data-parallel gradient mean sums
    # per-device partial sums, so 1 and 8 devices give the same run up to float rounding, not bit for bit.
    summary = {"steps": end, "images_per_s_this_run": seen / max(elapsed, 1e-9), "train_seconds_this_run": elapsed,
               "devices": jax.device_count(), "backend": jax.default_backend(),
               "step_compiles_this_run": compile_count() - compiles_before, "processes": jax.process_count()}
    if stopped_at is not None:
        summary["stopped"] = "SIGTERM"
    return state, summary
