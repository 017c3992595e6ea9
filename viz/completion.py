"""A second opinion on the one-step completion: finish the denoising from x_t with K DDIM steps.

The model's own x̂0 completes a trajectory in one step. The proposal's "separate denoising process"
instead restarts from the noisy sample x_t of a step and runs a short, separate DDIM sampler (eta = 0)
from that step's timestep down to 0 in K steps, with the pipeline's own UNet and guidance. K = 1 is
x̂0 itself; K = 2 or 4 shows how much a few more model calls change the completion.

All chosen steps go through one jitted function: `jax.vmap` over the steps of a `lax.scan` over K.
"""

from __future__ import annotations

import weakref

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.errors import SdjaxError
from sdjax.schedulers.base import clip_or_threshold
from sdjax.schedulers.ddpm import x0_from_alpha_space

COMPLETION_STEPS = (1, 2, 4)
_COMPILED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def completion_timesteps(t0, alpha_bar0, alphas_cumprod, num_steps: int):
    """The K model timesteps t0 > ... > 0 and the K+1 alpha_bars of the DDIM run (the last is 1: clean).

    The first point is the trajectory's own (t0, alpha_bar0), exact for sigma-space samplers whose t0 is
    fractional; the next ones are training timesteps round(t0 * (K - k) / K) with their alphas_cumprod."""
    k = jnp.arange(1, num_steps)
    ts_next = jnp.round(t0 * (num_steps - k) / num_steps)
    ts = jnp.concatenate([jnp.reshape(t0, (1,)), ts_next]).astype(jnp.float32)
    ab_next = jnp.take(jnp.asarray(alphas_cumprod), ts_next.astype(jnp.int32))
    abar = jnp.concatenate([jnp.reshape(alpha_bar0, (1,)), ab_next, jnp.ones((1,))]).astype(jnp.float32)
    return ts, abar


def _completion_fn(pipe, num_steps: int):
    per_pipe = _COMPILED.setdefault(pipe, {})
    if num_steps in per_pipe:
        return per_pipe[num_steps]
    sched = pipe.scheduler
    cfg = dict(sched.config)
    prediction_type = cfg.get("prediction_type", "epsilon")

    def complete_one(unet_params, context, guidance, x, t0, alpha_bar0):
        """x [B, C, h, w] in alpha space at (t0, alpha_bar0) -> the clean sample after K DDIM steps."""
        ts, abar = completion_timesteps(t0, alpha_bar0, sched.alphas_cumprod, num_steps)

        def body(x, k):
            tt = jnp.broadcast_to(ts[k], (2 * x.shape[0],))
            out = pipe.unet.apply({"params": unet_params}, jnp.concatenate([x, x]).astype(pipe.dtype), tt, context)
            eps_uncond, eps_cond = jnp.split(out.astype(jnp.float32), 2)
            guided = eps_uncond + guidance * (eps_cond - eps_uncond)
            x0, eps = x0_from_alpha_space(prediction_type, guided, x, abar[k] ** 0.5, (1.0 - abar[k]) ** 0.5)
            x0 = clip_or_threshold(x0, cfg)
            return abar[k + 1] ** 0.5 * x0 + (1.0 - abar[k + 1]) ** 0.5 * eps, None

        x, _ = jax.lax.scan(body, x.astype(jnp.float32), jnp.arange(num_steps))
        return x

    def complete(params, prompt_ids, neg_prompt_ids, guidance, xs, t0s, alpha_bar0s):
        context = jnp.concatenate([pipe.encode_prompt(params, neg_prompt_ids), pipe.encode_prompt(params, prompt_ids)])
        return jax.vmap(complete_one, in_axes=(None, None, None, 0, 0, 0))(
            params["unet"], context, guidance, xs, t0s, alpha_bar0s)

    fn = jax.jit(complete)
    per_pipe[num_steps] = fn
    return fn


def ddim_completions(pipe, params, data, steps: list[int], num_steps: int = 4) -> np.ndarray:
    """Complete x_t of each chosen step with `num_steps` DDIM steps -> [S, B, C, h, w] clean latents.

    Guidance scale and prompts are the trajectory's (data.settings, data.prompts)."""
    if num_steps not in COMPLETION_STEPS:
        raise SdjaxError(f"--completion-steps must be one of {COMPLETION_STEPS} (or 0 to skip), got {num_steps}")
    idx = np.asarray(steps, np.int64)
    xs = data.noisy_latents()[idx]                       # alpha space
    t0s = data.timesteps[idx].astype(np.float32)
    ab0s = data.alpha_bar[idx].astype(np.float32)
    ids = pipe.prepare_inputs(data.prompts)
    neg = pipe.unconditional_ids(len(data.prompts))
    guidance = jnp.float32(data.settings.get("guidance_scale", 7.5))
    fn = _completion_fn(pipe, int(num_steps))
    return np.asarray(fn(params, ids, neg, guidance, xs, t0s, ab0s), np.float32)
