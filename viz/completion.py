"""A second opinion on the one-step completion: finish the denoising from x_t with K DDIM steps.

The model's own x̂0 completes a trajectory in one step. The proposal's "separate denoising process"
instead restarts from the noisy sample x_t of a step and runs a short, separate DDIM sampler (eta = 0)
from that step's timestep down to 0 in K steps, with the pipeline's own UNet and guidance. K = 1 is
x̂0 itself; K = 2 or 4 shows how much a few more model calls change the completion.

It is the pipeline's own engine: `engine.denoise` with the DDIM scheduler's step over a state built for
the step's noise level (`DDIMScheduler.state_from_levels`), `jax.vmap`ped over the chosen steps, in
one compiled program per (pipeline, K).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.errors import SdjaxError
from sdjax.pipelines import FlaxStableDiffusionControlNetPipeline, FlaxStableDiffusionPipeline, denoise
from sdjax.pipelines.controlnet import ControlNetSettings
from sdjax.pipelines.auto import pipeline_for
from sdjax.schedulers import get_scheduler

from . import COMPLETION_STEPS


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


def completion_pipeline(pipe) -> FlaxStableDiffusionPipeline:
    """`pipe` with a deterministic DDIM scheduler on its training schedule, x̂0 clipped as `pipe`'s own sampler does
    (a text-to-image pipeline over its modules; with its ControlNets when it has them)."""
    cfg = pipe.scheduler.config
    ddim = get_scheduler("ddim", base_config=cfg, eta=0.0, clip_sample=bool(cfg.get("clip_sample", False)),
                         thresholding=bool(cfg.get("thresholding", False)))
    cls = FlaxStableDiffusionControlNetPipeline if getattr(pipe, "controlnet", ()) else pipeline_for(pipe, "text2img")
    return cls.from_pipe(pipe, scheduler=ddim)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _complete(ddim_pipe, num_steps: int, params, prompt_ids, neg_prompt_ids, guidance, xs, t0s, alpha_bar0s,
              extras=None):
    """xs [S, B, C, h, w] in alpha space at (t0s, alpha_bar0s) [S] -> the clean samples after K DDIM steps.
    extras: what the UNet saw besides the text ({"extra_channels": [B, c, h, w], "class_labels": [B]}, or a
    ControlNet run's {"control_image": ([B, 3, H, W], ...), "controlnet_conditioning_scale": [K]}), or None."""
    sched = ddim_pipe.scheduler
    context = ddim_pipe.text_context(params, prompt_ids, neg_prompt_ids)
    extras = extras or {}
    labels = extras.get("class_labels")
    unet_inputs = None if labels is None else (lambda x, t, i: {"class_labels": jnp.concatenate([labels, labels])})
    if "control_image" in extras:  # every ControlNet at its scale on each of the K steps, as in the run
        k = len(extras["control_image"])
        inputs = {"prompt_ids": prompt_ids, "neg_prompt_ids": neg_prompt_ids, "control_image": extras["control_image"],
                  "controlnet_conditioning_scale": extras["controlnet_conditioning_scale"][None],
                  "controlnet_keep": jnp.ones((1, num_steps, k))}
        h, w = extras["control_image"][0].shape[-2:]
        settings = ControlNetSettings(num_steps, h, w, return_trajectory=False)  # no guess mode: viz runs without
        unet_inputs = ddim_pipe.control_unet_inputs(settings, inputs, params)
    model_fn = ddim_pipe.guided_model(params, context, guidance, extra_channels=extras.get("extra_channels"),
                                      unet_inputs=unet_inputs)

    def complete_one(x, t0, alpha_bar0):
        ts, abar = completion_timesteps(t0, alpha_bar0, sched.alphas_cumprod, num_steps)
        final, _, _ = denoise(sched, sched.state_from_levels(ts, abar), x.astype(jnp.float32), model_fn,
                           jax.random.PRNGKey(0), return_trajectory=False)
        return final

    return jax.vmap(complete_one)(xs, t0s, alpha_bar0s)


def ddim_completions(pipe, params, data, steps: list[int], num_steps: int = 4) -> np.ndarray:
    """Complete x_t of each chosen step with `num_steps` DDIM steps -> [S, B, C, h, w] clean latents.

    Guidance scale and prompts are the trajectory's (data.settings, data.prompts)."""
    if num_steps not in COMPLETION_STEPS:
        raise SdjaxError(f"--completion-steps must be one of {COMPLETION_STEPS} (or 0 to skip), got {num_steps}")
    idx = np.asarray(steps, np.int64)
    xs = data.noisy_latents()[idx]                       # alpha space
    t0s = data.timesteps[idx].astype(np.float32)
    ab0s = data.alpha_bar[idx].astype(np.float32)
    ddim_pipe = completion_pipeline(pipe)  # a text-to-image pipeline over pipe's modules (an upscaler's too)
    ids = ddim_pipe.prepare_inputs(data.prompts)
    # the trajectory's unconditional half: the empty prompt's embeddings, or SDXL's zeros (force_zeros_for_empty_prompt)
    neg = None if getattr(pipe, "force_zeros_for_empty_prompt", False) else ddim_pipe.unconditional_ids(len(data.prompts))
    guidance = jnp.full((len(data.prompts),), data.settings.get("guidance_scale", 7.5), jnp.float32)
    extras = None if data.unet_extras is None else {k: jnp.asarray(v) for k, v in data.unet_extras.items()}
    control = getattr(data, "control", None)
    if control is not None:
        if len(control["images"]) != len(getattr(pipe, "controlnet", ())):
            raise SdjaxError(f"the trajectory was made with {len(control['images'])} ControlNet(s), the pipeline has "
                             f"{len(getattr(pipe, 'controlnet', ()))}: complete it with the run's own pipeline")
        extras = {"control_image": tuple(jnp.asarray(im) for im in control["images"]),
                  "controlnet_conditioning_scale": jnp.asarray(control["scales"], jnp.float32)}
        params = ddim_pipe._with_controlnet_params(params)
    out = _complete(ddim_pipe, int(num_steps), params, ids, neg, guidance, xs, t0s, ab0s, extras)
    return np.asarray(out, np.float32)
