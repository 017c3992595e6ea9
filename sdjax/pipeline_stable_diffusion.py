"""FlaxStableDiffusionPipeline: text -> image, with the whole denoising trajectory, in one compiled call.

    pipe, params = FlaxStableDiffusionPipeline.from_pretrained("path/or/repo", dtype=jnp.bfloat16)
    prompt_ids = pipe.prepare_inputs(["a photo of a cat"])
    out = pipe(prompt_ids, params, jax.random.PRNGKey(0), num_inference_steps=50)
    out.images                         # [B, H, W, 3] float32 in [0, 1]
    out.trajectory.latents             # [T+1, B, C, h, w]: x_T, then the sample after every step
    out.trajectory.pred_original_samples  # [T, B, C, h, w]: the model's x̂0 at every step

Data flows one way (`_generate`): prompt ids -> text embeddings -> `lax.scan` over steps (UNet on the
cond/uncond batch, guidance, scheduler step, x̂0) -> latents -> VAE decode -> images.
T is the number of model evaluations: the scheduler's `timesteps` (T+1 for PLMS, 2T-1 for Heun, as in diffusers).
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from .errors import ConfigError, SdjaxError
from .hub import resolve_folder
from .models.attention import ATTENTION_PROBS
from .models.autoencoder_kl import AutoencoderKL
from .models.clip_text import CLIPTextModel
from .models.modeling_utils import read_json, write_json
from .models.unet_2d_condition import UNet2DConditionModel
from .schedulers import get_scheduler, load_scheduler_config
from .tokenizer import load_tokenizer

logger = logging.getLogger(__name__)

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
# Components of a diffusers Stable Diffusion folder that sdjax does not run (and does not download).
SKIPPED_COMPONENTS = ("safety_checker", "feature_extractor", "image_encoder")
COMPILE_CACHE_ENV = "SDJAX_COMPILE_CACHE"


@flax.struct.dataclass
class Trajectory:
    latents: jax.Array                # [T+1, B, C, h, w]: initial noise, then the sample after each step
    pred_original_samples: jax.Array  # [T, B, C, h, w]: x̂0 predicted at each step
    timesteps: jax.Array              # [T]
    noise_levels: jax.Array           # [T]: sigma (sigma-space schedulers) or sqrt(1 - alpha_bar_t)
    attention_maps: jax.Array | None = None  # [T, B, h, w, L]: cross-attention per token (when asked)


@flax.struct.dataclass
class FlaxStableDiffusionPipelineOutput:
    images: jax.Array                 # [B, H, W, 3] float32 in [0, 1]
    trajectory: Trajectory | None = None
    frames: np.ndarray | None = None  # [T, B, H, W, 3] uint8: decoded x̂0 (decode_trajectory=True)


def enable_compile_cache(cache_dir: str | os.PathLike | None = None) -> str | None:
    """Turn on JAX's persistent compilation cache (a second process then skips compilation)."""
    cache_dir = cache_dir or os.environ.get(COMPILE_CACHE_ENV)
    if not cache_dir:
        return None
    cache_dir = os.path.abspath(os.path.expanduser(os.fspath(cache_dir)))
    os.makedirs(cache_dir, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return cache_dir


class FlaxStableDiffusionPipeline:
    """Stateless, like diffusers' Flax pipeline: the modules live here, their params are passed to each call."""

    def __init__(self, text_encoder: CLIPTextModel, vae: AutoencoderKL, unet: UNet2DConditionModel,
                 tokenizer, scheduler, dtype=jnp.float32, scheduler_base_config: dict | None = None):
        self.text_encoder = text_encoder
        self.vae = vae
        self.unet = unet
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.scheduler_base_config = dict(scheduler_base_config or scheduler.config)
        self.dtype = dtype
        self.vae_scale_factor = 2 ** (len(vae.block_out_channels) - 1)
        self._compiled = {}

    # ------------------------------------------------------------------ loading / saving
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, dtype=jnp.float32, scheduler=None,
                        param_dtype=None, allow_pickle: bool = False, revision: str | None = None,
                        compile_cache_dir: str | None = None):
        """Load a diffusers-format Stable Diffusion folder (or hub repo id): returns (pipeline, params).

        scheduler: None (the folder's own), a name (ddim, pndm, euler, ...), a config dict, or a scheduler.
        """
        enable_compile_cache(compile_cache_dir)
        root = resolve_folder(pretrained_model_name_or_path, allow_patterns=_pipeline_patterns(), revision=revision)
        index_path = root / "model_index.json"
        if not index_path.is_file():
            raise SdjaxError(f"{root} is not a diffusers pipeline folder: model_index.json is missing "
                             f"(expected subfolders {', '.join(COMPONENTS)})")
        index = read_json(index_path)
        extra = [k for k, v in index.items() if not k.startswith("_") and k not in COMPONENTS
                 and k not in SKIPPED_COMPONENTS and isinstance(v, list) and v[0] is not None]
        if extra:
            raise ConfigError(f"{index_path}: components {extra} are not supported by sdjax's Stable Diffusion "
                              f"pipeline (supported: {', '.join(COMPONENTS)}; SDXL and other pipelines are not)")
        kw = dict(dtype=dtype, param_dtype=param_dtype, allow_pickle=allow_pickle)
        text_encoder, te_params = CLIPTextModel.from_pretrained(root, subfolder="text_encoder", **kw)
        vae, vae_params = AutoencoderKL.from_pretrained(root, subfolder="vae", **kw)
        unet, unet_params = UNet2DConditionModel.from_pretrained(root, subfolder="unet", **kw)
        tokenizer = load_tokenizer(root, subfolder="tokenizer")
        # The folder's raw config is the base for any other method, keys of other schedulers included
        # (SD's PNDM config carries `clip_sample: false` for DDIM), as diffusers' X.from_config does.
        folder_config = load_scheduler_config(root, subfolder="scheduler")
        sched = get_scheduler(folder_config if scheduler is None else scheduler, base_config=folder_config)
        pipe = cls(text_encoder, vae, unet, tokenizer, sched, dtype=dtype, scheduler_base_config=folder_config)
        params = {"text_encoder": te_params, "vae": vae_params, "unet": unet_params}
        return pipe, params

    def save_pretrained(self, save_directory, params) -> None:
        """Write a diffusers-format folder (model_index.json + subfolders) that diffusers' PyTorch pipeline loads."""
        root = Path(save_directory)
        root.mkdir(parents=True, exist_ok=True)
        self.text_encoder.save_pretrained(root / "text_encoder", params["text_encoder"])
        self.vae.save_pretrained(root / "vae", params["vae"])
        self.unet.save_pretrained(root / "unet", params["unet"])
        self.tokenizer.save_pretrained(root / "tokenizer")
        self.scheduler.save_pretrained(root / "scheduler")
        write_json(root / "model_index.json", {
            "_class_name": "StableDiffusionPipeline",
            "_diffusers_version": "0.35.0",
            "feature_extractor": [None, None],
            "requires_safety_checker": False,
            "safety_checker": [None, None],
            "scheduler": ["diffusers", self.scheduler.diffusers_class],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        })

    def with_scheduler(self, scheduler) -> "FlaxStableDiffusionPipeline":
        """A pipeline sharing these modules with another sampling method (name, config or scheduler)."""
        sched = get_scheduler(scheduler, base_config=self.scheduler_base_config)
        return FlaxStableDiffusionPipeline(self.text_encoder, self.vae, self.unet, self.tokenizer, sched, self.dtype,
                                           self.scheduler_base_config)

    # ------------------------------------------------------------------ inputs
    def prepare_inputs(self, prompt: str | list[str]) -> np.ndarray:
        """Tokenize prompts to int32 [B, 77] (padded; longer prompts are truncated with a warning)."""
        if isinstance(prompt, str):
            prompt = [prompt]
        if not isinstance(prompt, (list, tuple)) or not all(isinstance(p, str) for p in prompt):
            raise SdjaxError(f"`prompt` has to be a string or a list of strings, got {type(prompt).__name__}")
        max_len = self.tokenizer.model_max_length
        ids = self.tokenizer(list(prompt), padding="max_length", max_length=max_len, truncation=True,
                             return_tensors="np").input_ids
        full = self.tokenizer(list(prompt), padding=False, truncation=False).input_ids
        for p, f in zip(prompt, full):
            if len(f) > max_len:
                removed = self.tokenizer.decode(f[max_len - 1:-1])
                warnings.warn(f"prompt is longer than the text encoder's {max_len} tokens and was truncated; "
                              f"removed: {removed!r} (from prompt {p[:60]!r}...)", stacklevel=2)
        return ids.astype(np.int32)

    @property
    def default_size(self) -> int:
        return int(self.unet.sample_size) * self.vae_scale_factor

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        return (batch, self.unet.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)

    def check_inputs(self, height: int, width: int, num_inference_steps: int) -> None:
        multiple = self.vae_scale_factor * 2 ** (len(self.unet.down_block_types) - 1)
        for name, v in (("height", height), ("width", width)):
            if not isinstance(v, (int, np.integer)) or v <= 0 or v % multiple:
                raise SdjaxError(f"`{name}` must be a positive multiple of {multiple} (the VAE factor "
                                 f"{self.vae_scale_factor} x the UNet's {2 ** (len(self.unet.down_block_types) - 1)}x "
                                 f"downsampling), got {v}")
        if not isinstance(num_inference_steps, (int, np.integer)) or num_inference_steps < 1:
            raise SdjaxError(f"`num_inference_steps` must be an integer >= 1, got {num_inference_steps!r}")

    # ------------------------------------------------------------------ the computation
    def encode_prompt(self, params, prompt_ids):
        return self.text_encoder.apply({"params": params["text_encoder"]}, prompt_ids).last_hidden_state

    def unconditional_ids(self, batch: int) -> np.ndarray:
        return np.tile(self.prepare_inputs([""]), (batch, 1))

    def decode_latents(self, vae_params, latents):
        """Latents (NCHW, scaled) -> images [B, H, W, 3] float32 in [0, 1]."""
        image = self.vae.apply({"params": vae_params}, latents / self.vae.scaling_factor, method=self.vae.decode)
        image = (image.astype(jnp.float32) / 2 + 0.5).clip(0, 1)
        return image.transpose(0, 2, 3, 1)

    def _generate(self, prompt_ids, params, prng_seed, guidance_scale, latents, neg_prompt_ids, *,
                  num_inference_steps: int, height: int, width: int, return_trajectory: bool,
                  output_attentions: bool, random_latents: bool):
        batch = prompt_ids.shape[0]
        cond = self.encode_prompt(params, prompt_ids)
        uncond = self.encode_prompt(params, neg_prompt_ids)
        context = jnp.concatenate([uncond, cond])  # one UNet call for both halves of classifier-free guidance

        shape = self.latent_shape(batch, height, width)
        sched = self.scheduler
        state = sched.set_timesteps(num_inference_steps, shape)
        noise_key, step_key = jax.random.split(prng_seed)
        if random_latents:  # `latents` is then a placeholder of the right shape
            latents = jax.random.normal(noise_key, shape, dtype=jnp.float32)
        latents = latents.astype(jnp.float32) * sched.init_noise_sigma(state)
        n_calls = state.timesteps.shape[0]

        def unet(x, t):
            variables = {"params": params["unet"]}
            tt = jnp.broadcast_to(t, (x.shape[0],))
            if not output_attentions:
                return self.unet.apply(variables, x, tt, context), None
            out, col = self.unet.apply(variables, x, tt, context, mutable=[ATTENTION_PROBS])
            return out, _token_maps(col[ATTENTION_PROBS], x.shape[2:], batch)

        def step(carry, i):
            sched_state, sample = carry
            model_input = sched.scale_model_input(sched_state, jnp.concatenate([sample] * 2), i)
            out, maps = unet(model_input.astype(self.dtype), sched_state.timesteps[i])
            eps_uncond, eps_cond = jnp.split(out.astype(jnp.float32), 2)
            guided = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
            sched_state, sample, x0 = sched.step(sched_state, guided, i, sample, key=jax.random.fold_in(step_key, i))
            ys = (sample, x0, maps) if return_trajectory else None
            return (sched_state, sample), ys

        (_, final), ys = jax.lax.scan(step, (state, latents), jnp.arange(n_calls))
        images = self.decode_latents(params["vae"], final)
        if not return_trajectory:
            return images, None
        samples, x0s, maps = ys
        trajectory = Trajectory(
            latents=jnp.concatenate([latents[None], samples]),
            pred_original_samples=x0s,
            timesteps=state.timesteps,
            noise_levels=jax.vmap(lambda i: sched.sigma_or_noise_level(state, i))(jnp.arange(n_calls)),
            attention_maps=maps,
        )
        return images, trajectory

    def _compiled_generate(self, mode: str, static: dict, mesh: Mesh | None = None):
        """One compiled program per (mode, static settings): guidance, seed, prompts and latents are traced."""
        key = (mode, tuple(sorted(static.items())), None if mesh is None else id(mesh))
        fn = self._compiled.get(key)
        if fn is None:
            body = functools.partial(self._generate, **static)
            if mode == "pmap":
                fn = jax.pmap(body, in_axes=(0, 0, 0, 0, 0, 0))
            elif mode == "mesh":
                data, rep = NamedSharding(mesh, P(mesh.axis_names)), NamedSharding(mesh, P())
                fn = jax.jit(body, in_shardings=(data, rep, rep, rep, data, data),
                             out_shardings=(data, None if not static["return_trajectory"] else Trajectory(
                                 latents=NamedSharding(mesh, P(None, mesh.axis_names)),
                                 pred_original_samples=NamedSharding(mesh, P(None, mesh.axis_names)),
                                 timesteps=rep, noise_levels=rep,
                                 attention_maps=NamedSharding(mesh, P(None, mesh.axis_names))
                                 if static["output_attentions"] else None)))
            else:
                fn = jax.jit(body)
            self._compiled[key] = fn
        return fn

    def __call__(self, prompt_ids, params, prng_seed, num_inference_steps: int = 50,
                 guidance_scale: float | jax.Array = 7.5, height: int | None = None, width: int | None = None,
                 latents=None, neg_prompt_ids=None, jit: bool = False, return_trajectory: bool = True,
                 decode_trajectory: bool = False, output_attentions: bool = False, mesh: Mesh | None = None):
        """Generate images (and the trajectory) in one compiled call.

        jit=False: one jax.jit program on the default device, any batch size.
        jit=True: jax.pmap over local devices, as diffusers did: params replicated (flax.jax_utils.replicate),
            prompt_ids [n_devices, per_device, 77], prng_seed [n_devices, 2]; outputs gain a leading device axis.
        mesh=Mesh(...): jax.jit with the batch sharded over the mesh's devices (multi-host ready).
        """
        height = height or self.default_size
        width = width or self.default_size
        self.check_inputs(height, width, num_inference_steps)
        static = dict(num_inference_steps=int(num_inference_steps), height=int(height), width=int(width),
                      return_trajectory=bool(return_trajectory), output_attentions=bool(output_attentions))
        prompt_ids = jnp.asarray(prompt_ids, dtype=jnp.int32)

        if jit:
            if prompt_ids.ndim != 3:
                raise SdjaxError(f"with jit=True, prompt_ids must be sharded as [n_devices, per_device, "
                                 f"{self.tokenizer.model_max_length}] (flax.training.common_utils.shard); got shape "
                                 f"{tuple(prompt_ids.shape)}")
            n_dev = prompt_ids.shape[0]
            if n_dev != jax.local_device_count():
                raise SdjaxError(f"with jit=True, prompt_ids' leading axis ({n_dev}) must equal the number of local "
                                 f"devices ({jax.local_device_count()}); the batch must be divisible by it")
            per_dev = prompt_ids.shape[1]
            if neg_prompt_ids is None:
                neg_prompt_ids = np.broadcast_to(self.unconditional_ids(per_dev), prompt_ids.shape)
            guidance = jnp.broadcast_to(jnp.asarray(guidance_scale, jnp.float32), (n_dev,))
            if latents is None:
                latents = jnp.zeros((n_dev,) + self.latent_shape(per_dev, height, width), jnp.float32)
                fn = self._compiled_generate("pmap", static | {"random_latents": True})
            else:
                fn = self._compiled_generate("pmap", static | {"random_latents": False})
            images, traj = fn(prompt_ids, params, prng_seed, guidance, jnp.asarray(latents), jnp.asarray(neg_prompt_ids))
        else:
            if prompt_ids.ndim != 2:
                raise SdjaxError(f"prompt_ids must be [batch, {self.tokenizer.model_max_length}] int32 "
                                 f"(pipe.prepare_inputs), got shape {tuple(prompt_ids.shape)}")
            batch = prompt_ids.shape[0]
            if mesh is not None and batch % mesh.size:
                raise SdjaxError(f"batch size {batch} must be divisible by the mesh's {mesh.size} devices")
            if neg_prompt_ids is None:
                neg_prompt_ids = self.unconditional_ids(batch)
            random_latents = latents is None
            if random_latents:
                latents = jnp.zeros(self.latent_shape(batch, height, width), jnp.float32)
            fn = self._compiled_generate("mesh" if mesh is not None else "jit",
                                         static | {"random_latents": random_latents}, mesh)
            images, traj = fn(prompt_ids, params, prng_seed, jnp.asarray(guidance_scale, jnp.float32),
                              jnp.asarray(latents), jnp.asarray(neg_prompt_ids, jnp.int32))

        frames = None
        if decode_trajectory and traj is not None:
            x0 = traj.pred_original_samples
            vae_params = params["vae"] if not jit else jax.tree_util.tree_map(lambda x: x[0], params["vae"])
            if jit:  # [n_dev, T, per_dev, ...] -> [T, n_dev * per_dev, ...]
                x0 = jnp.swapaxes(x0, 0, 1).reshape((x0.shape[1], -1) + x0.shape[3:])
            frames = self.decode_frames(vae_params, x0)
        return FlaxStableDiffusionPipelineOutput(images=images, trajectory=traj, frames=frames)

    # ------------------------------------------------------------------ trajectory decoding
    def decode_frames(self, vae_params, latents, chunk_size: int = 8, progress: bool = True) -> np.ndarray:
        """Decode latent frames [T, B, C, h, w] to uint8 images [T, B, H, W, 3], a chunk at a time.

        Only one chunk of float images exists at once, so a 50-step, batch-8, 512x512 trajectory
        (400 frames, 315 MB as uint8) decodes on one accelerator.
        """
        from tqdm.auto import tqdm

        latents = np.asarray(latents)
        t, b = latents.shape[:2]
        flat = latents.reshape((t * b,) + latents.shape[2:])
        n = flat.shape[0]
        decode = self._decode_uint8()
        chunks = []
        for start in tqdm(range(0, n, chunk_size), desc="decoding frames", unit="chunk", disable=not progress,
                          leave=False):
            part = flat[start:start + chunk_size]
            pad = chunk_size - part.shape[0]
            if pad:  # keep one compiled shape
                part = np.concatenate([part, np.repeat(part[-1:], pad, axis=0)])
            chunks.append(np.asarray(decode(vae_params, part))[: chunk_size - pad])
        frames = np.concatenate(chunks)
        return frames.reshape((t, b) + frames.shape[1:])

    def _decode_uint8(self):
        fn = self._compiled.get("decode_uint8")
        if fn is None:
            fn = jax.jit(lambda p, z: jnp.round(self.decode_latents(p, z) * 255).astype(jnp.uint8))
            self._compiled["decode_uint8"] = fn
        return fn


def _token_maps(sown: dict, latent_hw: tuple[int, int], batch: int):
    """Average the sown cross-attention probabilities over layers -> [B, h, w, L] at latent resolution.

    Each layer's probs are [2B, h_l * w_l, L] (uncond half first); we keep the conditional half, reshape
    to the layer's resolution and upsample (nearest) to the latent's, then average over layers.
    """
    h, w = latent_hw
    maps = []
    for probs in jax.tree_util.tree_leaves(sown):
        cond = probs[batch:]
        n = cond.shape[1]
        scale = int(round((h * w / n) ** 0.5))
        hl, wl = h // scale, w // scale
        m = cond.reshape(batch, hl, wl, -1)
        m = jnp.repeat(jnp.repeat(m, scale, axis=1), scale, axis=2)
        maps.append(m)
    return jnp.mean(jnp.stack(maps), axis=0)


def _pipeline_patterns():
    """What to download for a repo id: configs, tokenizer files and non-variant safetensors; never pickles."""
    pats = ["model_index.json", "scheduler/*.json", "tokenizer/*"]
    for sub in ("unet", "vae", "text_encoder"):
        pats += [f"{sub}/config.json", f"{sub}/diffusion_pytorch_model.safetensors", f"{sub}/model.safetensors",
                 f"{sub}/*.safetensors.index.json", f"{sub}/*-of-*.safetensors"]
    return pats
