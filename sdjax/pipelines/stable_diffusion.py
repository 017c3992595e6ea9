"""FlaxStableDiffusionPipeline: text -> image, with the whole denoising trajectory, in one compiled call.

    pipe, params = FlaxStableDiffusionPipeline.from_pretrained("path/or/repo", dtype=jnp.bfloat16)
    prompt_ids = pipe.prepare_inputs(["a photo of a cat"])
    out = pipe(prompt_ids, params, jax.random.PRNGKey(0), num_inference_steps=50)
    out.images                         # [B, H, W, 3] float32 in [0, 1]
    out.trajectory.latents             # [T+1, B, C, h, w]: x_T, then the sample after every step
    out.trajectory.pred_original_samples  # [T, B, C, h, w]: the model's x̂0 at every step

Data flows one way (`generate`): prompt ids -> text embeddings -> `engine.denoise` (one `lax.scan` over
steps: UNet on the uncond/cond batch, guidance, scheduler step, x̂0) -> latents -> VAE decode -> images.
T is the number of model evaluations: the scheduler's `timesteps` (T+1 for PLMS, 2T-1 for Heun, as in diffusers).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from ..errors import InputError, SdjaxError
from ..guidance import classifier_free_guidance
from ..io import write_json
from ..models.attention import ATTENTION_PROBS
from ..models.autoencoder_kl import AutoencoderKL
from ..models.clip_text import CLIPTextModel
from ..models.unet_2d_condition import UNet2DConditionModel
from ..schedulers import get_scheduler, load_scheduler_config
from ..textual_inversion import maybe_convert_prompt
from ..tokenizer import load_tokenizer
from .base import DiffusionPipeline, check_components, open_pipeline_folder, runtime_for, weight_patterns
from .engine import Conditioning, Settings, denoise
from .loading import check_pipeline_class


class FlaxStableDiffusionPipeline(DiffusionPipeline):
    """Stateless, like diffusers' Flax pipeline: the modules live here, their params are passed to each call."""

    components = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")

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

    # ------------------------------------------------------------------ loading / saving
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, dtype=jnp.float32, scheduler=None,
                        param_dtype=None, allow_pickle: bool = False, revision: str | None = None,
                        abstract: bool = False, vae_encoder: bool = True, **runtime):
        """Load a diffusers-format Stable Diffusion folder (or hub repo id): returns (pipeline, params).

        scheduler: None (the folder's own), a name (ddim, pndm, euler, ...), a config dict, or a scheduler.
        abstract: read configs only; params are `jax.ShapeDtypeStruct`s (nothing loaded): to compile with
            `pipe.lower(...).compile()` before the weights are in memory.
        vae_encoder: False leaves the VAE's encoder unread (params["vae"] without "encoder"/"quant_conv"; ~130 MiB
            less for SD): text-to-image never encodes; pipelines that do (image-to-image) refuse such params.
        runtime: kernel choices for every model (`attention_kernel=`, `conv_kernel=`; default "auto").
        """
        root, index = open_pipeline_folder(pretrained_model_name_or_path, weight_patterns(cls.components),
                                           revision=revision)
        check_pipeline_class(index, root / "model_index.json", cls)
        check_components(index, root / "model_index.json", cls.components, cls.__name__)
        kw = dict(dtype=dtype, param_dtype=param_dtype, allow_pickle=allow_pickle, abstract=abstract)
        text_encoder, te_params = CLIPTextModel.from_pretrained(
            root, subfolder="text_encoder", **kw, **runtime_for(CLIPTextModel, runtime))
        vae, vae_params = AutoencoderKL.from_pretrained(root, subfolder="vae", skip=cls.vae_skip(vae_encoder), **kw,
                                                        **runtime_for(AutoencoderKL, runtime))
        unet, unet_params = UNet2DConditionModel.from_pretrained(
            root, subfolder="unet", **kw, **runtime_for(UNet2DConditionModel, runtime))
        tokenizer = load_tokenizer(root, subfolder="tokenizer")
        # The folder's raw config is the base for any other method, keys of other schedulers included
        # (SD's PNDM config carries `clip_sample: false` for DDIM), as diffusers' X.from_config does.
        folder_config = load_scheduler_config(root, subfolder="scheduler")
        sched = get_scheduler(folder_config if scheduler is None else scheduler, base_config=folder_config)
        pipe = cls(text_encoder, vae, unet, tokenizer, sched, dtype=dtype, scheduler_base_config=folder_config)
        params = {"text_encoder": te_params, "vae": vae_params, "unet": unet_params}
        return pipe, params

    @classmethod
    def from_pipe(cls, pipe: "FlaxStableDiffusionPipeline", **changes):
        """A pipeline of this class over another pipeline's modules (diffusers' `from_pipe`): nothing is
        reloaded, and the same params dict serves both. `changes` replace components (e.g. scheduler=...)."""
        parts = dict(text_encoder=pipe.text_encoder, vae=pipe.vae, unet=pipe.unet, tokenizer=pipe.tokenizer,
                     scheduler=pipe.scheduler, dtype=pipe.dtype, scheduler_base_config=pipe.scheduler_base_config)
        parts.update(changes)
        if isinstance(parts["scheduler"], (str, dict)):
            parts["scheduler"] = get_scheduler(parts["scheduler"], base_config=parts["scheduler_base_config"])
        return cls(**parts)

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

    def with_scheduler(self, scheduler):
        """A pipeline sharing these modules with another sampling method (name, config or scheduler)."""
        return type(self).from_pipe(self, scheduler=scheduler)

    # ------------------------------------------------------------------ inputs
    def prepare_inputs(self, prompt: str | list[str]) -> np.ndarray:
        """Tokenize prompts to int32 [B, 77] (padded; longer prompts are truncated with a warning)."""
        if isinstance(prompt, str):
            prompt = [prompt]
        if not isinstance(prompt, (list, tuple)) or not all(isinstance(p, str) for p in prompt):
            raise SdjaxError(f"`prompt` has to be a string or a list of strings, got {type(prompt).__name__}")
        prompt = maybe_convert_prompt(list(prompt), self.tokenizer)  # textual inversion's multi-vector tokens
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
        return (batch, self.unet.out_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)

    def check_inputs(self, height: int, width: int, num_inference_steps: int, batch: int = 1) -> None:
        """Sizes, step count and memory as the pipeline accepts them (the CLI and trajectories check before any
        array is made)."""
        self.check_size(height, width)
        self.check_steps(num_inference_steps)
        self.check_memory(batch, height, width)

    def unconditional_ids(self, batch: int) -> np.ndarray:
        return np.tile(self.prepare_inputs([""]), (batch, 1))

    # ------------------------------------------------------------------ the computation (traced)
    def encode_prompt(self, params, prompt_ids):
        return self.text_encoder.apply({"params": params["text_encoder"]}, prompt_ids).last_hidden_state

    def text_context(self, params, prompt_ids, neg_prompt_ids):
        """[uncond; cond] text embeddings: one UNet call serves both halves of classifier-free guidance."""
        return jnp.concatenate([self.encode_prompt(params, neg_prompt_ids), self.encode_prompt(params, prompt_ids)])

    def unet_output(self, params, sample, timestep, context, output_attentions: bool = False, **unet_kwargs):
        """The UNet on [2B, C, h, w] at one timestep -> (prediction, cross-attention maps [B, h, w, L] or None).
        unet_kwargs: what a pipeline adds to the UNet call (SDXL's added_cond_kwargs, a ControlNet's residuals)."""
        variables = {"params": params["unet"]}
        t = jnp.broadcast_to(timestep, (sample.shape[0],))
        x = sample.astype(self.dtype)
        if not output_attentions:
            return self.unet.apply(variables, x, t, context, **unet_kwargs), None
        out, col = self.unet.apply(variables, x, t, context, mutable=[ATTENTION_PROBS], **unet_kwargs)
        return out, _token_maps(col[ATTENTION_PROBS], sample.shape[2:], sample.shape[0] // 2)

    def guided_model(self, params, context, guidance_scale, output_attentions: bool = False, extra_channels=None,
                     unet_inputs=None, guidance_rescale=None):
        """The engine's model_fn for text guidance: scaled input, UNet on [uncond; cond], classifier-free guidance.

        extra_channels [B, c, h, w]: concatenated to the scaled latents on the channel axis (an inpainting
            UNet's mask and masked-image latents, an upscaler's low-resolution image), for both halves.
        unet_inputs(x, t, i) -> dict: more UNet arguments for the call at step i on input x (both halves), e.g. a
            ControlNet's residuals or SDXL's added_cond_kwargs.
        guidance_rescale [B] or None: diffusers' guidance_rescale (`guidance.rescale_noise_cfg`), traced.
        """
        sched = self.scheduler

        def model_fn(state, sample, i):
            x = sched.scale_model_input(state, jnp.concatenate([sample] * 2), i)
            if extra_channels is not None:
                x = jnp.concatenate([x, jnp.concatenate([extra_channels] * 2).astype(x.dtype)], axis=1)
            t = state.timesteps[i]
            kwargs = unet_inputs(x, t, i) if unet_inputs is not None else {}
            out, maps = self.unet_output(params, x, t, context, output_attentions, **kwargs)
            return classifier_free_guidance(out, guidance_scale, guidance_rescale), maps

        return model_fn

    def guidance_inputs(self, inputs: dict) -> dict:
        """More keyword arguments of `guided_model` from the call's (traced) inputs: none for text guidance; the
        classifier-guided pipeline passes its labels and classifier scale."""
        return {}

    def condition(self, settings: Settings, inputs: dict, params, state, noise_key) -> Conditioning:
        """What the denoising starts from and is conditioned on besides the text (traced). Text-to-image: noise
        (or the given latents) at the first step's noise level; subclasses add images, masks, controls."""
        shape = self.latent_shape(inputs["prompt_ids"].shape[0], settings.height, settings.width)
        latents = inputs.get("latents")
        if latents is None:
            latents = jax.random.normal(noise_key, shape, dtype=jnp.float32)
        return Conditioning(latents=latents.astype(jnp.float32) * self.scheduler.init_noise_sigma(state))

    def generate(self, settings: Settings, inputs: dict, params, key):
        """Traced: inputs {prompt_ids, neg_prompt_ids, guidance_scale [B], ...} -> (images, trajectory, diagnostics).

        The one data flow of every pipeline: text -> `condition` (starting latents, first step, extra UNet
        inputs) -> `engine.denoise` -> VAE decode."""
        prompt_ids = inputs["prompt_ids"]
        context = self.text_context(params, prompt_ids, inputs["neg_prompt_ids"])
        shape = self.latent_shape(prompt_ids.shape[0], settings.height, settings.width)
        state = self.scheduler.set_timesteps(settings.num_inference_steps, shape)
        noise_key, loop_key = jax.random.split(key)
        cond = self.condition(settings, inputs, params, state, noise_key)
        state = self.scheduler.begin_at(state, cond.start)
        model_fn = self.guided_model(params, context, inputs["guidance_scale"], settings.output_attentions,
                                     extra_channels=cond.extra_channels, unet_inputs=cond.unet_inputs,
                                     guidance_rescale=inputs.get("guidance_rescale"), **self.guidance_inputs(inputs))
        final, trajectory, first_nonfinite = denoise(self.scheduler, state, cond.latents, model_fn, loop_key,
                                                     start=cond.start, end=cond.end, post_step=cond.post_step,
                                                     return_trajectory=settings.return_trajectory,
                                                     progress=settings.progress)
        images, images_finite = self.output_images(settings, params, final)
        return images, trajectory, {"first_nonfinite": first_nonfinite, "images_finite": images_finite}

    def output_images(self, settings: Settings, params, latents):
        """(images, all finite) from the final latents: the VAE's decode (SDXL's output_type="latent": the latents)."""
        return self.decode_to_images(params["vae"], latents)

    def __call__(self, prompt_ids, params, prng_seed, num_inference_steps: int = 50,
                 guidance_scale: float | jax.Array = 7.5, height: int | None = None, width: int | None = None,
                 latents=None, neg_prompt_ids=None, jit: bool = False, return_trajectory: bool = True,
                 decode_trajectory: bool = False, output_attentions: bool = False, mesh: Mesh | None = None,
                 check_finite: bool = True, lora_scale=None):
        """Generate images (and the trajectory) in one compiled call.

        jit=False: one jax.jit program on the default device, any batch size.
        jit=True: jax.pmap over local devices, as diffusers did: params replicated (flax.jax_utils.replicate),
            prompt_ids [n_devices, per_device, 77], prng_seed [n_devices, 2]; outputs gain a leading device axis.
        mesh=Mesh(...): jax.jit with the batch sharded over the mesh's devices (multi-host ready).
        guidance_scale: a number, or one per prompt ([B]); traced, so changing it does not recompile.
        check_finite: a result holding NaN/inf raises NonFiniteError naming the first step that went non-finite.
        lora_scale: the LoRA adapters' scales for this call (params from load_lora_weights): a number (all), or
            {adapter: number | {"unet": s, "text_encoder": s}}; adapters not named keep their scale (1.0 unless
            set_adapters set another). Traced: changing it does not recompile.
        Arguments are checked before anything is compiled (InputError naming the argument).
        """
        params = self.set_lora_scale(params, lora_scale)
        settings, inputs = self.prepare_call(prompt_ids, params, prng_seed, num_inference_steps, guidance_scale,
                                             height, width, latents, neg_prompt_ids, jit, mesh, return_trajectory,
                                             output_attentions)
        outputs = self._run(settings, inputs, params, prng_seed, jit=jit, mesh=mesh)
        return self.finish(outputs, params, jit, decode_trajectory=decode_trajectory, check_finite=check_finite)

    # ------------------------------------------------------------------ host-side helpers
    def prepare_call(self, prompt_ids, params, prng_seed, num_inference_steps, guidance_scale, height, width,
                     latents, neg_prompt_ids, jit, mesh, return_trajectory, output_attentions):
        """Check every argument and build (Settings, inputs) for the compiled program."""
        height = self.default_size if height is None else height
        width = self.default_size if width is None else width
        height, width = self.check_size(height, width)
        steps = self.check_steps(num_inference_steps)
        self.check_params(params, jit)
        self.check_key(prng_seed, jit)
        inputs = self.text_inputs(prompt_ids, neg_prompt_ids, guidance_scale, jit, mesh)
        batch_shape = self.prompt_batch_shape(inputs["prompt_ids"])
        devices = mesh.size if mesh is not None else (batch_shape[0] if jit else 1)
        self.check_memory(int(np.prod(batch_shape)) // devices, height, width)  # the batch on one device
        if latents is not None:
            inputs["latents"] = self.check_latents(latents, batch_shape + self.latent_shape(1, height, width)[1:])
        settings = Settings(num_inference_steps=steps, height=height, width=width,
                            return_trajectory=bool(return_trajectory), output_attentions=bool(output_attentions))
        return settings, inputs

    def prompt_batch_shape(self, prompt_ids) -> tuple:
        """The batch axes of prompt ids ([B], or [n_devices, per_device] with jit=True): all but the token axis
        (SDXL's ids have one more axis, the tokenizer)."""
        return tuple(np.shape(prompt_ids)[:-1])

    def text_inputs(self, prompt_ids, neg_prompt_ids, guidance_scale, jit: bool, mesh) -> dict:
        """The batch-major inputs every text-guided pipeline starts from (with a device axis when jit=True)."""
        prompt_ids = self.check_token_ids(prompt_ids, "prompt_ids", jit)
        if jit:
            n_dev = prompt_ids.shape[0]
            if n_dev != jax.local_device_count():
                raise InputError(f"with jit=True, prompt_ids' leading axis ({n_dev}) must equal the number of local "
                                 f"devices ({jax.local_device_count()}); the batch must be divisible by it")
        elif mesh is not None and prompt_ids.shape[0] % mesh.size:
            raise InputError(f"batch size {prompt_ids.shape[0]} must be divisible by the mesh's {mesh.size} devices")
        batch_shape = self.prompt_batch_shape(prompt_ids)
        if neg_prompt_ids is None:
            neg_prompt_ids = np.broadcast_to(self.unconditional_ids(1)[0], prompt_ids.shape)
        neg_prompt_ids = self.check_token_ids(neg_prompt_ids, "neg_prompt_ids", jit, like=prompt_ids)
        return {"prompt_ids": prompt_ids, "neg_prompt_ids": neg_prompt_ids,
                "guidance_scale": self.check_guidance(guidance_scale, batch_shape)}


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
