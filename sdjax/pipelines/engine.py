"""The one engine every pipeline runs on: a `jax.lax.scan` over the scheduler's model calls.

    final, trajectory, first_nonfinite = denoise(scheduler, state, latents, model_fn, key)

`model_fn(state, sample, i)` returns the model output the scheduler steps with (the UNet's prediction,
already guided), and optionally per-step extras (attention maps). Everything a pipeline adds (text,
an image, a mask, ControlNet residuals, a classifier's gradient) lives in its `model_fn` and
`post_step`; the loop, the trajectory and x̂0 are the same for all of them.

The compiled programs are two module-level callables, built once: `run_jit` (jax.jit) and `run_pmap`
(jax.pmap, diffusers' `jit=True`). The pipeline object and a `Settings` value are static arguments,
hashed by value, so JAX's own cache holds one program per (pipeline config, settings, shapes);
everything else (prompts, guidance, strength, noise, images) is traced and never recompiles.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Callable

import flax
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from .adapters import merge_adapters
from .output import Trajectory


@dataclasses.dataclass(frozen=True)
class Settings:
    """What a compiled program is specialised on (static): step count, size, which outputs."""

    num_inference_steps: int
    height: int
    width: int
    return_trajectory: bool = True
    output_attentions: bool = False
    progress: bool = False  # a host callback per step (show_progress); False compiles no callback at all


@flax.struct.dataclass
class Conditioning:
    """What a pipeline's `condition` hook gives the engine (all traced): the latents the first call sees, the
    first call to run (`start`, image-to-image) and the first not to run (`end`, SDXL's denoising_end),
    channels concatenated to the UNet's input, more UNet arguments per step, and a post-step hook."""

    latents: jax.Array
    start: jax.Array | int = 0
    end: jax.Array | None = None
    extra_channels: jax.Array | None = None
    unet_inputs: Callable | None = flax.struct.field(pytree_node=False, default=None)
    post_step: Callable | None = flax.struct.field(pytree_node=False, default=None)


def denoise(scheduler, state, latents, model_fn, key, *, start=0, end=None, post_step=None, return_trajectory=True,
            progress=False):
    """Run the scheduler's model calls `start` .. `end` - 1 (default: all N) on `latents` in one `lax.scan`.

    scheduler, state: an sdjax scheduler and its `set_timesteps` state.
    model_fn(state, sample, i) -> (model_output, extras): the prediction at call i (extras: a pytree or None).
    key: the sampler's own randomness (ancestral steps); call i uses fold_in(key, i).
    start: the first call to run (image-to-image); a traced int costs only the calls it runs (the others are
        skipped by `lax.cond`), so changing it does not recompile. A Python 0 compiles no condition at all.
    end: the first call not to run (None: all); traced like `start`.
    progress: once per call, tell the host (`jax.debug.callback`, no arguments) that a call ran: it moves the
        progress bar `show_progress` opened (by at most one step early). False (the default) adds nothing.
    post_step(sample, x0, i) -> sample: applied after each scheduler step (inpainting puts the known region back).
    Returns (final sample, Trajectory or None, first_nonfinite): the trajectory has all N calls (entries before
    `start` hold the unchanged sample and zeros; `Trajectory.steps(start)` cuts them off); first_nonfinite is
    the first call after which the sample held NaN or inf, or -1 (one reduction per step: the caller can name
    the step where a generation went wrong without keeping the trajectory).
    """
    n = scheduler.num_model_calls(state)

    def run(carry, i):
        sched_state, sample, first_bad = carry
        out, extras = model_fn(sched_state, sample, i)
        sched_state, sample, x0 = scheduler.step(sched_state, out, i, sample, key=jax.random.fold_in(key, i))
        if post_step is not None:
            sample = post_step(sample, x0, i)
        first_bad = jnp.where((first_bad < 0) & ~jnp.all(jnp.isfinite(sample)), i, first_bad)
        return (sched_state, sample, first_bad), (sample, x0, extras)

    def skipped(carry, i):  # a call before `start`: the sample stays, x̂0 and extras are zeros
        _, x0, extras = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(run, carry, i)[1])
        return carry, (carry[1], x0, extras)

    always = not isinstance(start, jax.Array) and int(start) == 0 and end is None

    def step(carry, i):
        if always:
            new, ys = run(carry, i)
        else:
            active = i >= start if end is None else (i >= start) & (i < end)
            new, ys = jax.lax.cond(active, run, skipped, carry, i)
        if progress:  # no arguments: passing even the step index costs ~0.6 ms a step on CPU; the host counts
            jax.debug.callback(_step_done)
        return new, ys if return_trajectory else None

    (_, final, first_bad), ys = jax.lax.scan(step, (state, latents, jnp.int32(-1)), jnp.arange(n))
    if not return_trajectory:
        return final, None, first_bad
    samples, x0s, extras = ys
    trajectory = Trajectory(
        latents=jnp.concatenate([latents[None], samples]),
        pred_original_samples=x0s,
        timesteps=state.timesteps,
        noise_levels=jax.vmap(lambda i: scheduler.sigma_or_noise_level(state, i))(jnp.arange(n)),
        attention_maps=extras,
    )
    return final, trajectory, first_bad


# ---------------------------------------------------------------------------------------------- progress
_BARS: list = []  # the bars `show_progress` has open in this process (the innermost gets the steps)


class StepCounter:
    """A bar and the number of step callbacks a call's program makes per step: 1 for jax.jit (one device or a
    mesh: the callback runs once per step in each process), the local device count under pmap (each device)."""

    def __init__(self, bar, callers: int = 1):
        self.bar, self.callers, self.calls = bar, max(int(callers), 1), 0
        self._lock = threading.Lock()  # pmap's devices call from several threads

    def step_done(self) -> None:
        with self._lock:
            self.calls += 1
            done = self.calls // self.callers
            total = getattr(self.bar, "total", None)
            if total:
                done = min(done, total)
            if done > self.bar.n:
                self.bar.update(done - self.bar.n)


def _step_done() -> None:
    if _BARS:
        _BARS[-1].step_done()


class show_progress:
    """A progress bar (tqdm) that advances from inside the compiled scan while a pipeline call runs:

        with sdjax.show_progress():
            out = pipe(prompt_ids, params, key)

    Calls made inside the block compile with a host callback after each step (a separate program from the one
    without it); outside, nothing changes. The call waits for its result before returning."""

    enabled: bool = False

    def __init__(self, desc: str = "denoising", **tqdm_kwargs):
        self.desc, self.tqdm_kwargs = desc, tqdm_kwargs

    def __enter__(self):
        self._previous, show_progress.enabled = show_progress.enabled, True
        return self

    def __exit__(self, *exc):
        show_progress.enabled = self._previous

    @staticmethod
    def bar(total: int, desc: str = "denoising"):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit="step", leave=False)


# ------------------------------------------------------------------------------------------ compiled entries
def _run(pipe, settings, inputs, params, key):
    # LoRA adapters in params["lora"] are merged here, inside the program, at their traced scales (no-op without)
    return pipe.generate(settings, inputs, merge_adapters(params), key)


#: One jax.jit program per (pipeline, settings, input shapes): JAX's cache; used with and without a mesh.
run_jit = jax.jit(_run, static_argnums=(0, 1))
#: diffusers' `jit=True`: the same program pmapped over local devices (inputs and params with a device axis).
run_pmap = jax.pmap(_run, axis_name="devices", static_broadcasted_argnums=(0, 1))


def place_on_mesh(mesh: Mesh, inputs, params, key):
    """Put a call's arguments on a mesh: every input split along its leading (batch) axis over all of the
    mesh's axes, params and key replicated. `run_jit` then compiles for that placement."""
    batch = NamedSharding(mesh, P(mesh.axis_names))
    replicated = NamedSharding(mesh, P())
    return _put(inputs, batch), _put(params, replicated), _put(key, replicated)


def _put(tree, sharding):
    """device_put; abstract leaves (jax.ShapeDtypeStruct, for `pipe.lower`) get the sharding instead."""
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding) if isinstance(x, jax.ShapeDtypeStruct)
        else jax.device_put(x, sharding), tree)
