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
from sdjax.pipelines import FlaxStableDiffusionImg2ImgPipeline, FlaxStableDiffusionInpaintPipeline
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
             settings_extra: dict | None = None, image=None, mask=None, strength: float | None = None) -> VizData:
    """One compiled pipeline call for all prompts, keeping the trajectory (and attention maps if asked).

    image (PIL or float [H, W, 3] in [0, 1], used for every prompt): an image-to-image run from `strength`
    (default 0.8); with `mask` too, an inpainting run (strength default 1.0): the grid then shows the edit's
    steps, the ones actually run."""
    if not prompts:
        raise SdjaxError("no prompt given (--prompt TEXT)")
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
        pipe = FlaxStableDiffusionImg2ImgPipeline.from_pipe(pipe)
        strength = 0.8 if strength is None else strength
        ids, images = pipe.prepare_inputs(prompts, [image] * n)
        height, width = images.shape[-2:]
        pipe.check_inputs(height, width, steps, n)
        out = pipe(ids, images, params, loop_key(seed, 0), strength=strength,
                   noise=initial_latents(pipe, seeds, height, width), **common)
    else:
        pipe = FlaxStableDiffusionInpaintPipeline.from_pipe(pipe)
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
