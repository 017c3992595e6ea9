"""The training loop both stages share: restore or initialise the state, step, log, checkpoint.

Batches and random keys are functions of (seed, step), so a run resumed from a checkpoint continues
exactly the run that was interrupted.
"""

from __future__ import annotations

import logging
import time

import jax
from tqdm.auto import tqdm

from . import parallel

logger = logging.getLogger(__name__)


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


def run_steps(cfg, state, start, step_fn, make_batch, ckpt, log, *, desc, until_step=None, final_save=True,
              progress=True):
    """Steps `start` .. min(num_steps, until_step): returns (state, summary of this run).

    make_batch(step) -> the sharded batch for that step; step_fn(state, batch, key) -> (state, metrics).
    """
    base_key = jax.random.PRNGKey(cfg.seed)
    end = cfg.num_steps if until_step is None else min(cfg.num_steps, until_step)
    t0, seen = time.time(), 0
    bar = tqdm(range(start, end), initial=start, total=cfg.num_steps, desc=desc, disable=not progress)
    for step in bar:
        state, metrics = step_fn(state, make_batch(step), jax.random.fold_in(base_key, step))
        seen += cfg.batch_size
        if (step + 1) % cfg.log_every == 0 or step + 1 == end:
            m = {k: float(v) for k, v in metrics.items()}
            log.write(step + 1, **m)
            bar.set_postfix(loss=f"{m['loss']:.4f}")
        ckpt.maybe_save(step + 1, state)
    elapsed = time.time() - t0
    if final_save:
        ckpt.maybe_save(end, state, force=True)
    ckpt.close()
    # The device count is part of what makes a run bit-reproducible: the data-parallel gradient mean sums
    # per-device partial sums, so 1 and 8 devices give the same run up to float rounding, not bit for bit.
    summary = {"steps": end, "images_per_s_this_run": seen / max(elapsed, 1e-9), "train_seconds_this_run": elapsed,
               "devices": jax.device_count(), "backend": jax.default_backend()}
    return state, summary
