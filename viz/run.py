"""The numbers every picture is drawn from: a trajectory (live or from a shard) and its decoded frames.

    data = run_live(pipe, params, ["a red circle on a white background"], seed=0, steps=25, guidance=5.0)
    data = from_shard("trajs/shard-00000.safetensors")      # same fields, no model run
    frames = decode(pipe, params["vae"], data)               # uint8 x_t, x̂0 and final images

Indexing: step i (0-based, i < T) is the i-th model call. It sees the sample ``latents[i]`` (x_t) at
``timesteps[i]`` and predicts ``x0[i]`` (x̂0, the one-step completion). ``latents[T]`` is the final sample.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from sdjax.errors import SdjaxError
from sdjax.pipelines.auto import pipeline_for
from sdjax.schedulers.registry import SCHEDULERS
from sdjax.seeds import loop_key, sample_seeds
from sdjax.trajectories import initial_latents, load_shard


@dataclasses.dataclass
class VizData:
    prompts: list[str]
    seeds: list[int]
    latents: np.ndarray          # [T+1, B, C, h, w] in the sampler's space
    x0: np.ndarray               # [T, B, C, h, w] the model's x̂0 at each step
    timesteps: np.ndarray        # [T]
    noise_levels: np.ndarray     # [T] sigma (sigma space) or sqrt(1 - alpha_bar)
    sigma_space: bool
    settings: dict               # steps, guidance_scale, scheduler, height, width, (model)
    attention_maps: np.ndarray | None = None  # [T, B, h, w, L] cross-attention per token (live runs only)
    # what else the UNet saw besides the text (an upscaler: the noised low-resolution image [B, 3, h, w] as
    # "extra_channels" and its noise level [B] as "class_labels"), for the K-step completions
    unet_extras: dict | None = None
    # a ControlNet run: {"images": one float [B, 3, H, W] array in [0, 1] per ControlNet, "scales": one float each};
    # the grid shows the images, the K-step completions use the ControlNets as the run did
    control: dict | None = None

    @property
    def num_steps(self) -> int:
        return self.x0.shape[0]

    @property
    def batch(self) -> int:
        return self.x0.shape[1]

    @property
    def noise_level_name(self) -> str:
        return "sigma" if self.sigma_space else "sqrt(1-alpha_bar)"

    @property
    def alpha_bar(self) -> np.ndarray:
        """alpha_bar_t of each step, from its noise level (both spaces)."""
        s = self.noise_levels.astype(np.float64)
        return 1.0 / (1.0 + s * s) if self.sigma_space else 1.0 - s * s

    def noisy_latents(self) -> np.ndarray:
        """x_t of each step [T, B, ...] in alpha space (sqrt(ab) x0 + sqrt(1-ab) eps), the VAE's scale.

        Sigma-space samples are x0 + sigma * eps; dividing by sqrt(1 + sigma^2) gives the same point in
        alpha space, so x_t frames look alike whatever the sampler."""
        x = self.latents[:-1]
        if self.sigma_space:
            x = x / np.sqrt(1.0 + self.noise_levels.astype(np.float32) ** 2)[:, None, None, None, None]
        return x.astype(np.float32)


@dataclasses.dataclass
class Frames:
    noisy: np.ndarray   # [T, B, H, W, 3] uint8: decoded x_t
    x0: np.ndarray      # [T, B, H, W, 3] uint8: decoded x̂0
    final: np.ndarray   # [B, H, W, 3] uint8: the decoded final sample


def run_live(pipe, params, prompts: list[str], *, seed: int = 0, steps: int = 25, guidance: float = 5.0,
             height: int | None = None, width: int | None = None, attentions: bool = False,
             settings_extra: dict | None = None, image=None, mask=None, strength: float | None = None,
             control_image=None, control_scale=1.0) -> VizData:
    """One compiled pipeline call for all prompts, keeping the trajectory (and attention maps if asked).

    image (PIL or float [H, W, 3] in [0, 1], used for every prompt): an image-to-image run from `strength`
    (default 0.8); with `mask` too, an inpainting run (strength default 1.0): the grid then shows the edit's
    steps, the ones actually run.
    control_image (a ControlNet pipeline, FlaxStableDiffusionControlNetPipeline): its control image (PIL or float
    [H, W, 3] in [0, 1], used for every prompt), or a list, one per ControlNet; the output has its size.
    control_scale: controlnet_conditioning_scale, a number or one per ControlNet."""
    if not prompts:
        raise SdjaxError("no prompt given (--prompt TEXT)")
    if getattr(pipe, "controlnet", ()) or control_image is not None:
        if image is not None or mask is not None or strength is not None:
            raise SdjaxError("--control-image with --image/--mask/--strength: sdjax viz shows ControlNet text-to-image "
                             "runs only")
        return _run_live_control(pipe, params, prompts, seed, steps, guidance, height, width, attentions,
                                 settings_extra, control_image, control_scale)
    if mask is not None and image is None:
        raise SdjaxError("--mask needs --image (the image to inpaint)")
    if strength is not None and image is None:
        raise SdjaxError("--strength needs --image (it is how far an image is noised before denoising)")
    seeds = sample_seeds(seed, range(len(prompts)))
    n = len(prompts)
    settings = {"steps": steps, "guidance_scale": guidance, "seed": seed, **(settings_extra or {})}
    common = dict(num_inference_steps=steps, guidance_scale=guidance, return_trajectory=True,
                  output_attentions=attentions)
    if image is None:
        height = pipe.default_size if height is None else height
        width = pipe.default_size if width is None else width
        pipe.check_inputs(height, width, steps, n)
        # Same noise and loop key as the first shard of `sdjax trajectories --seed seed`, so both agree.
        out = pipe(pipe.prepare_inputs(prompts), params, loop_key(seed, 0), height=height, width=width,
                   latents=initial_latents(pipe, seeds, height, width), **common)
    elif mask is None:
        pipe = pipeline_for(pipe, "img2img").from_pipe(pipe)  # SD or SDXL: the same modules
        strength = 0.8 if strength is None else strength
        ids, images = pipe.prepare_inputs(prompts, [image] * n)
        height, width = images.shape[-2:]
        pipe.check_inputs(height, width, steps, n)
        out = pipe(ids, images, params, loop_key(seed, 0), strength=strength,
                   noise=initial_latents(pipe, seeds, height, width), **common)
    else:
        pipe = pipeline_for(pipe, "inpaint").from_pipe(pipe)
        strength = 1.0 if strength is None else strength
        ids, masked, masks = pipe.prepare_inputs(prompts, [image] * n, [mask] * n)
        height, width = masked.shape[-2:]
        pipe.check_inputs(height, width, steps, n)
        out = pipe(ids, masks, masked, params, loop_key(seed, 0), strength=strength,
                   image=pipe.prepare_images([image] * n), noise=initial_latents(pipe, seeds, height, width), **common)
    settings |= {"height": int(height), "width": int(width)}
    if image is not None:
        settings |= {"strength": strength, "edit": "inpaint" if mask is not None else "img2img"}
    return from_output(pipe, out, prompts, seeds=seeds, settings=settings)


def _run_live_control(pipe, params, prompts, seed, steps, guidance, height, width, attentions, settings_extra,
                      control_image, control_scale) -> VizData:
    """run_live's ControlNet text-to-image run (the same initial noise and loop key as without the ControlNet)."""
    if not getattr(pipe, "controlnet", ()):
        raise SdjaxError("--control-image needs --controlnet PATH (a pipeline with a ControlNet: "
                         "FlaxStableDiffusionControlNetPipeline)")
    if control_image is None:
        raise SdjaxError("this pipeline has a ControlNet: give its control image (--control-image IMG, one per "
                         "--controlnet)")
    seeds = sample_seeds(seed, range(len(prompts)))
    images = list(control_image) if isinstance(control_image, (list, tuple)) else [control_image]
    control = [pipe.prepare_image_inputs(im, height, width) for im in images]  # [1, 3, H, W] each: one for all
    height, width = control[0].shape[-2:]
    pipe.check_inputs(height, width, steps, len(prompts))
    out = pipe(pipe.prepare_text_inputs(prompts), control, params, loop_key(seed, 0), num_inference_steps=steps,
               guidance_scale=guidance, height=height, width=width, latents=initial_latents(pipe, seeds, height, width),
               controlnet_conditioning_scale=control_scale, return_trajectory=True, output_attentions=attentions)
    scales = pipe._per_controlnet(control_scale, "controlnet_conditioning_scale")
    settings = {"steps": steps, "guidance_scale": guidance, "seed": seed, **(settings_extra or {}),
                "height": int(height), "width": int(width),
                "controlnet_conditioning_scale": scales[0] if len(scales) == 1 else scales}
    data = from_output(pipe, out, prompts, seeds=seeds, settings=settings)
    data.control = {"images": [np.broadcast_to(c, (len(prompts),) + c.shape[1:]).astype(np.float32) for c in control],
                    "scales": scales}
    return data


def from_output(pipe, out, prompts: list[str], seeds: list[int] | None = None, settings: dict | None = None) -> VizData:
    """From a pipeline call made in this process with return_trajectory=True (jit=False).

    settings should hold at least guidance_scale (used by the K-step completions) and steps."""
    tr = out.trajectory
    if tr is None:
        raise SdjaxError("the pipeline output has no trajectory: call the pipeline with return_trajectory=True")
    if tr.latents.ndim != 5:
        raise SdjaxError(f"expected trajectory latents [T+1, B, C, h, w], got shape {tuple(tr.latents.shape)} "
                         "(a jit=True output has a leading device axis: call with jit=False)")
    b = tr.latents.shape[1]
    if len(prompts) != b:
        raise SdjaxError(f"{len(prompts)} prompts for a batch of {b} trajectories")
    settings = {"scheduler": pipe.scheduler.name, "steps": tr.timesteps.shape[0], **(settings or {})}
    return VizData(
        prompts=list(prompts), seeds=list(seeds) if seeds is not None else list(range(b)),
        latents=np.asarray(tr.latents, np.float32), x0=np.asarray(tr.pred_original_samples, np.float32),
        timesteps=np.asarray(tr.timesteps, np.float32), noise_levels=np.asarray(tr.noise_levels, np.float32),
        sigma_space=bool(pipe.scheduler.sigma_space), settings=settings,
        attention_maps=None if tr.attention_maps is None else np.asarray(tr.attention_maps, np.float32))


def from_shard(path) -> VizData:
    """A shard written by `sdjax trajectories` (or `sdjax.trajectories.save_shard`)."""
    s = load_shard(path)
    settings = dict(s["settings"])
    name = settings.get("scheduler")
    if name not in SCHEDULERS:
        raise SdjaxError(f"{path}: unknown scheduler {name!r} in the shard's settings")
    prompts = list(s["prompts"])
    if len(prompts) != s["latents"].shape[1]:
        raise SdjaxError(f"{path}: {len(prompts)} prompts for a batch of {s['latents'].shape[1]} trajectories")
    settings.pop("prompts", None)  # the whole run's list; this shard's own are `prompts`
    t = s["timesteps"].shape[0]
    return VizData(
        prompts=prompts, seeds=[int(x) for x in s.get("seeds", np.arange(len(prompts)))],
        latents=s["latents"].astype(np.float32), x0=s["pred_original_samples"].astype(np.float32),
        timesteps=s["timesteps"].astype(np.float32),
        noise_levels=s.get("noise_levels", np.zeros(t, np.float32)).astype(np.float32),
        sigma_space=bool(SCHEDULERS[name].sigma_space), settings=settings)


def decode(pipe, vae_params, data: VizData, chunk_size: int = 32) -> Frames:
    """Decode x_t, x̂0 and the final sample of every step in one pass (one compiled chunk shape)."""
    if getattr(pipe, "controlnet", ()):  # the same VAE: reuse the text-to-image pipeline's compiled decoder
        pipe = pipeline_for(pipe, "text2img").from_pipe(pipe)
    t = data.num_steps
    stack = np.concatenate([data.noisy_latents(), data.x0, data.latents[-1:]])
    frames = pipe.decode_frames(vae_params, stack, chunk_size=min(chunk_size, stack.shape[0] * stack.shape[1]),
                                progress=False)
    return Frames(noisy=frames[:t], x0=frames[t:2 * t], final=frames[2 * t])


def choose_steps(num_steps: int, columns: int) -> tuple[list[int], str | None]:
    """`columns` step indices evenly spread over [0, T-1], always the first and the last.

    Returns (steps, note): note says when the request was clamped."""
    if columns < 1:
        raise SdjaxError(f"--columns must be >= 1, got {columns}")
    note = None
    if columns > num_steps:
        note = f"--columns {columns} is more than the {num_steps} steps; showing all {num_steps}"
        columns = num_steps
    if columns == 1:
        return [num_steps - 1], note
    steps = sorted({int(round(x)) for x in np.linspace(0, num_steps - 1, columns)})
    return steps, note


def run_live_cascade(base, base_params, upscaler, upscaler_params, prompts: list[str], *, seed: int = 0,
                     steps: int = 25, guidance: float = 5.0, upscaler_steps: int = 25, upscaler_guidance: float = 1.0,
                     noise_level: int = 100, attentions: bool = False, settings_extra: dict | None = None):
    """A cascade (text -> base -> upscaler) with both trajectories: (stage 1's VizData, stage 2's VizData). Stage 1
    is the run `run_live` makes with the same seed; stage 2's data carries the upscaler's conditioning."""
    import jax.numpy as jnp

    from sdjax.pipelines.cascade import run_cascade

    if not prompts:
        raise SdjaxError("no prompt given (--prompt TEXT)")
    out = run_cascade(base, base_params, upscaler, upscaler_params, list(prompts), seed=seed, steps=steps,
                      guidance=guidance, upscaler_steps=upscaler_steps, upscaler_guidance=upscaler_guidance,
                      noise_level=noise_level, return_trajectory=True, output_attentions=attentions)
    h, w = out.low_res.shape[1:3]
    common = {"seed": seed, **(settings_extra or {})}
    first = from_output(base, out.stage1, prompts, seeds=out.seeds, settings={
        "steps": steps, "guidance_scale": guidance, "height": h, "width": w, **common})
    levels = np.broadcast_to(np.asarray(noise_level, np.int32), (len(prompts),))
    image = jnp.transpose(2.0 * out.low_res - 1.0, (0, 3, 1, 2))
    noised = np.asarray(upscaler.noised_low_res(image, jnp.asarray(out.low_res_noise), jnp.asarray(levels)))
    second = from_output(upscaler, out.stage2, prompts, seeds=out.seeds, settings={
        "steps": upscaler_steps, "guidance_scale": upscaler_guidance, "height": out.images.shape[1],
        "width": out.images.shape[2], "noise_level": int(levels[0]) if np.all(levels == levels[0]) else levels.tolist(),
        **common})
    second.unet_extras = {"extra_channels": noised, "class_labels": levels}
    return first, second
