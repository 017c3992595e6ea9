"""FlaxStableDiffusionUpscalePipeline: diffusers' `StableDiffusionUpscalePipeline` (the SD x4 upscaler) on the one engine.

    pipe, params = FlaxStableDiffusionUpscalePipeline.from_pretrained("path/to/x4-upscaler-folder")
    prompt_ids, image = pipe.prepare_inputs(["a white cat"], [low_res_pil])  # image: [B, 3, h, w] in [-1, 1]
    out = pipe(prompt_ids, image, params, jax.random.PRNGKey(0), num_inference_steps=75, guidance_scale=9.0,
               noise_level=20)
    out.images                          # [B, h * f, w * f, 3] in [0, 1] (f = the VAE's factor, 4 for SD's)
    out.trajectory.latents              # [T+1, B, 4, h, w], out.trajectory.pred_original_samples: x̂0 per step

What the upscaler adds to text-to-image is one `condition` hook, as diffusers computes it: the low-resolution
image is noised to `noise_level` by the folder's `low_res_scheduler` (DDPM's closed-form forward process), then
concatenated to the latents on the channel axis at every step (the UNet takes latent + 3 channels), and the
noise level goes to the UNet as its class label. The latents have the low-resolution image's size; the VAE's
decoder does the upsampling. The denoising loop is `engine.denoise`, unchanged. `noise_level` is traced (one
per sample, [B]): changing it never recompiles.
"""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from ..errors import ConfigError, InputError
from ..io import write_json
from ..models.autoencoder_kl import AutoencoderKL
from ..models.clip_text import CLIPTextModel
from ..models.unet_2d_condition import UNet2DConditionModel
from ..schedulers import DDPMScheduler, get_scheduler, load_scheduler_config
from ..tokenizer import load_tokenizer
from .base import check_components, open_pipeline_folder, runtime_for, weight_patterns
from .engine import Settings
from .stable_diffusion import FlaxStableDiffusionPipeline

logger = logging.getLogger(__name__)

#: the latent scaling factor diffusers' StableDiffusionUpscalePipeline imposes on its VAE (it overrides any other)
UPSCALER_SCALING_FACTOR = 0.08333
#: diffusers' default `max_noise_level` (a model_index.json key of upscaler folders)
DEFAULT_MAX_NOISE_LEVEL = 350


class FlaxStableDiffusionUpscalePipeline(FlaxStableDiffusionPipeline):
    """Text-guided super-resolution: the text-to-image pipeline plus a low-resolution image and its noise level."""

    components = ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "low_res_scheduler")

    def __init__(self, text_encoder: CLIPTextModel, vae: AutoencoderKL, unet: UNet2DConditionModel, tokenizer,
                 scheduler, low_res_scheduler, dtype=jnp.float32, scheduler_base_config: dict | None = None,
                 max_noise_level: int = DEFAULT_MAX_NOISE_LEVEL):
        if not isinstance(low_res_scheduler, DDPMScheduler):
            raise ConfigError(f"low_res_scheduler must be a DDPMScheduler (diffusers' upscaler noises the "
                              f"low-resolution image with DDPM's add_noise), got {type(low_res_scheduler).__name__}")
        if unet.num_class_embeds is None:
            raise ConfigError("an upscaler's UNet takes the noise level as its class label: its config needs "
                              "num_class_embeds (the SD x4 upscaler has 1000)")
        if unet.in_channels != vae.latent_channels + 3:
            raise ConfigError(f"the UNet takes {unet.in_channels} input channels; an upscaler's takes the "
                              f"{vae.latent_channels} latent channels + 3 of the low-resolution image = "
                              f"{vae.latent_channels + 3}")
        if isinstance(max_noise_level, bool) or not isinstance(max_noise_level, (int, np.integer)) \
                or max_noise_level < 0:
            raise ConfigError(f"max_noise_level must be an int >= 0, got {max_noise_level!r}")
        if vae.scaling_factor != UPSCALER_SCALING_FACTOR:
            # As diffusers' StableDiffusionUpscalePipeline.__init__: any other value is replaced (with a warning).
            logger.warning("the VAE's scaling_factor is %s; the upscaler uses %s as diffusers does (a fine-tuned "
                           "stable-diffusion-x4-upscaler should have 0.08333 in vae/config.json)",
                           vae.scaling_factor, UPSCALER_SCALING_FACTOR)
            vae = vae.clone(scaling_factor=UPSCALER_SCALING_FACTOR)
        super().__init__(text_encoder, vae, unet, tokenizer, scheduler, dtype=dtype,
                         scheduler_base_config=scheduler_base_config)
        self.low_res_scheduler = low_res_scheduler
        self.max_noise_level = int(max_noise_level)

    # ------------------------------------------------------------------ loading / saving
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, dtype=jnp.float32, scheduler=None,
                        param_dtype=None, allow_pickle: bool = False, revision: str | None = None,
                        abstract: bool = False, vae_encoder: bool = True, **runtime):
        """Load a diffusers `StableDiffusionUpscalePipeline` folder (or hub repo id): returns (pipeline, params).

        scheduler: None (the folder's own), a name (ddim, euler, ...), a config dict, or a scheduler; the
        low_res_scheduler is always the folder's (a DDPM config in `low_res_scheduler/`).
        vae_encoder: False leaves the VAE's encoder unread (the upscaler only decodes).
        """
        patterns = weight_patterns([c for c in cls.components if c != "low_res_scheduler"])
        root, index = open_pipeline_folder(pretrained_model_name_or_path,
                                           patterns + ["low_res_scheduler/*.json"], revision=revision)
        index_path = root / "model_index.json"
        check_components(index, index_path, cls.components, cls.__name__)
        if not isinstance(index.get("low_res_scheduler"), list) or not index["low_res_scheduler"] \
                or index["low_res_scheduler"][0] is None:
            raise ConfigError(f"{index_path} has no low_res_scheduler component: an upscaler folder names the DDPM "
                              "scheduler that noises the low-resolution image (a text-to-image folder? use "
                              "FlaxStableDiffusionPipeline)")
        low_res_config_path = root / "low_res_scheduler" / "scheduler_config.json"
        if not low_res_config_path.is_file():
            raise ConfigError(f"the upscaler folder {root} has no low_res_scheduler/scheduler_config.json (the DDPM "
                              "scheduler that noises the low-resolution image; model_index.json names it)")
        low_res_scheduler = get_scheduler(load_scheduler_config(root, subfolder="low_res_scheduler"))
        max_noise_level = index.get("max_noise_level", DEFAULT_MAX_NOISE_LEVEL)
        kw = dict(dtype=dtype, param_dtype=param_dtype, allow_pickle=allow_pickle, abstract=abstract)
        text_encoder, te_params = CLIPTextModel.from_pretrained(
            root, subfolder="text_encoder", **kw, **runtime_for(CLIPTextModel, runtime))
        vae, vae_params = AutoencoderKL.from_pretrained(root, subfolder="vae", skip=cls.vae_skip(vae_encoder), **kw,
                                                        **runtime_for(AutoencoderKL, runtime))
        unet, unet_params = UNet2DConditionModel.from_pretrained(
            root, subfolder="unet", **kw, **runtime_for(UNet2DConditionModel, runtime))
        tokenizer = load_tokenizer(root, subfolder="tokenizer")
        folder_config = load_scheduler_config(root, subfolder="scheduler")
        sched = get_scheduler(folder_config if scheduler is None else scheduler, base_config=folder_config)
        pipe = cls(text_encoder, vae, unet, tokenizer, sched, low_res_scheduler, dtype=dtype,
                   scheduler_base_config=folder_config, max_noise_level=max_noise_level)
        return pipe, {"text_encoder": te_params, "vae": vae_params, "unet": unet_params}

    @classmethod
    def from_pipe(cls, pipe: "FlaxStableDiffusionUpscalePipeline", **changes):
        parts = dict(text_encoder=pipe.text_encoder, vae=pipe.vae, unet=pipe.unet, tokenizer=pipe.tokenizer,
                     scheduler=pipe.scheduler, low_res_scheduler=pipe.low_res_scheduler, dtype=pipe.dtype,
                     scheduler_base_config=pipe.scheduler_base_config, max_noise_level=pipe.max_noise_level)
        parts.update(changes)
        if isinstance(parts["scheduler"], (str, dict)):
            parts["scheduler"] = get_scheduler(parts["scheduler"], base_config=parts["scheduler_base_config"])
        return cls(**parts)

    def save_pretrained(self, save_directory, params) -> None:
        """Write a diffusers `StableDiffusionUpscalePipeline` folder (loaded by diffusers' PyTorch pipeline too)."""
        super().save_pretrained(save_directory, params)
        self.low_res_scheduler.save_pretrained(Path(save_directory) / "low_res_scheduler")
        write_json(Path(save_directory) / "model_index.json", {
            "_class_name": "StableDiffusionUpscalePipeline",
            "_diffusers_version": "0.35.0",
            "feature_extractor": [None, None],
            "low_res_scheduler": ["diffusers", self.low_res_scheduler.diffusers_class],
            "max_noise_level": self.max_noise_level,
            "safety_checker": [None, None],
            "scheduler": ["diffusers", self.scheduler.diffusers_class],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "watermarker": [None, None],
        })

    def param_components(self) -> tuple[str, ...]:
        return ("unet", "vae", "text_encoder")

    # ------------------------------------------------------------------ inputs
    def prepare_inputs(self, prompt: str | list[str], image=None):
        """(prompt_ids int32 [B, 77], low-resolution images float32 [B, 3, h, w] in [-1, 1]), as diffusers' Flax
        image pipelines prepared them. image: a PIL image, a list of them, or an array [h, w, 3] / [B, h, w, 3]
        (uint8, or floats in [0, 1]); one per prompt, or one for all. Images are not resized: their size sets
        the output's (h * the VAE's factor)."""
        if image is None:
            raise InputError("the upscaler needs the low-resolution image(s): pipe.prepare_inputs(prompts, images) "
                             "(pipe.tokenize(prompts) gives the prompt ids alone)")
        prompt_ids = self.tokenize(prompt)
        images = low_res_images(image)
        if images.shape[0] == 1 and prompt_ids.shape[0] > 1:
            images = np.repeat(images, prompt_ids.shape[0], axis=0)
        if images.shape[0] != prompt_ids.shape[0]:
            raise InputError(f"{prompt_ids.shape[0]} prompt(s) and {images.shape[0]} image(s): give one image per "
                             "prompt, or one for all")
        return prompt_ids, images

    def tokenize(self, prompt: str | list[str]) -> np.ndarray:
        """The prompt ids alone (int32 [B, 77]): text-to-image's prepare_inputs."""
        return super().prepare_inputs(prompt)

    def unconditional_ids(self, batch: int) -> np.ndarray:
        return np.tile(self.tokenize([""]), (batch, 1))

    def check_noise_level(self, noise_level, batch_shape: tuple):
        """Integers in [0, max_noise_level] (and inside the UNet's class table and the low_res_scheduler's
        timesteps): a number, or one per image ([B]; with jit=True [n_devices] or [n_devices, per_device])."""
        try:
            arr = np.asarray(noise_level)
        except (TypeError, ValueError):
            arr = np.asarray(None)
        limit = min(self.max_noise_level, self.unet.num_class_embeds - 1, self.low_res_scheduler.num_train_timesteps - 1)
        if arr.dtype.kind not in "iuf" or (arr.dtype.kind == "f" and not np.all(np.isfinite(arr))) \
                or (arr.dtype.kind == "f" and not np.all(arr == np.round(arr))):
            raise InputError(f"`noise_level` must be an integer or integers (one per image), got {noise_level!r}")
        if arr.size and (arr.min() < 0 or arr.max() > limit):
            raise InputError(f"`noise_level` must be in [0, {limit}] (max_noise_level {self.max_noise_level}, the "
                             f"UNet's {self.unet.num_class_embeds} class labels), got {noise_level!r}")
        arr = arr.astype(np.int32)
        if len(batch_shape) == 2 and arr.ndim == 1 and arr.shape[0] == batch_shape[0]:
            arr = arr[:, None]  # jit=True: one per device
        try:
            return jnp.asarray(np.broadcast_to(arr, batch_shape))
        except ValueError:
            raise InputError(f"`noise_level` has shape {arr.shape}; expected a number or one per image "
                             f"{tuple(batch_shape)}") from None

    def check_image(self, image, batch_shape: tuple, name: str = "image"):
        """Float [B, 3, h, w] in [-1, 1] (prepare_inputs' output; [n_devices, per_device, 3, h, w] with jit=True),
        one per prompt, finite."""
        arr = np.asarray(image)
        want = batch_shape + ("3", "h", "w")
        if arr.dtype.kind != "f" or arr.ndim != len(want) or tuple(arr.shape[:len(batch_shape)]) != batch_shape \
                or arr.shape[len(batch_shape)] != 3:
            raise InputError(f"`{name}` must be float [{', '.join(map(str, want))}] in [-1, 1], one per prompt "
                             f"(pipe.prepare_inputs(prompts, images){', then shard' if len(batch_shape) == 2 else ''}), "
                             f"got {arr.dtype} of shape {tuple(arr.shape)}")
        if not np.all(np.isfinite(arr)):
            raise InputError(f"`{name}` holds NaN or inf")
        if arr.size and (arr.min() < -1.0 - 1e-3 or arr.max() > 1.0 + 1e-3):
            raise InputError(f"`{name}` must hold values in [-1, 1] (got [{arr.min():g}, {arr.max():g}]): "
                             "pipe.prepare_inputs converts uint8 or [0, 1] images")
        return jnp.asarray(arr, jnp.float32)

    # ------------------------------------------------------------------ the computation (traced)
    def noised_low_res(self, image, noise, noise_level):
        """The UNet's extra channels: the low-resolution image at noise level t, sqrt(a_t) x + sqrt(1 - a_t) noise
        with the low_res_scheduler's alphas (diffusers' `low_res_scheduler.add_noise`)."""
        return self.low_res_scheduler.add_noise(image, noise, noise_level)

    def condition(self, settings: Settings, inputs: dict, params, state, noise_key):
        """Text-to-image's starting latents, plus the noised low-resolution image as extra UNet channels and its
        noise level as the UNet's class label (the same for both halves of classifier-free guidance)."""
        image = inputs["image"]
        noise = inputs.get("low_res_noise")
        if noise is None:
            noise = jax.random.normal(jax.random.fold_in(noise_key, 1), image.shape, jnp.float32)
        noise_level = inputs["noise_level"]
        noised = self.noised_low_res(image, noise, noise_level).astype(self.dtype)
        labels = jnp.concatenate([noise_level, noise_level])
        cond = super().condition(settings, inputs, params, state, noise_key)
        return cond.replace(extra_channels=noised, unet_inputs=lambda x, t, i: {"class_labels": labels})

    def decode_latents(self, vae_params, latents):
        """As diffusers' upscaler: a float16 VAE with force_upcast decodes in float32 (it overflows in float16)."""
        if jnp.dtype(self.vae.dtype) != jnp.float16 or not self.vae.force_upcast:
            return super().decode_latents(vae_params, latents)
        vae = self.vae.clone(dtype=jnp.float32)
        params32 = jax.tree_util.tree_map(lambda p: p.astype(jnp.float32), vae_params)
        image = vae.apply({"params": params32}, latents.astype(jnp.float32) / vae.scaling_factor, method=vae.decode)
        return (image / 2 + 0.5).clip(0, 1).transpose(0, 2, 3, 1)

    # ------------------------------------------------------------------ the call
    def __call__(self, prompt_ids, image, params, prng_seed, num_inference_steps: int = 75,
                 guidance_scale: float | jax.Array = 9.0, noise_level: int | jax.Array = 20,
                 height: int | None = None, width: int | None = None, latents=None, low_res_noise=None,
                 neg_prompt_ids=None, jit: bool = False, return_trajectory: bool = True,
                 decode_trajectory: bool = False, output_attentions: bool = False, mesh: Mesh | None = None,
                 check_finite: bool = True):
        """Upscale `image` (prepare_inputs' [B, 3, h, w] in [-1, 1]) guided by the prompts, in one compiled call.

        noise_level: how much noise the low-resolution image gets before the UNet sees it (0 .. max_noise_level;
            higher: the model invents more detail and follows the input less). A number or one per image;
            traced, so changing it does not recompile.
        height, width: the output size; default, and the only one accepted: the image's size x the VAE's factor.
        latents: the initial noise [B, C, h, w] (at the low-resolution size); low_res_noise: the noise added to
            the low-resolution image [B, 3, h, w]; both drawn from prng_seed when not given.
        Everything else as FlaxStableDiffusionPipeline.__call__ (jit=True: pmap with a device axis on every
        batch input; mesh: the batch split over the mesh).
        """
        h, w = self._low_res_size(image, jit)
        f = self.vae_scale_factor
        for name, given, low in (("height", height, h), ("width", width, w)):
            if given is not None and given != low * f:
                raise InputError(f"`{name}` = {given!r}, but the low-resolution image is {h}x{w} and the VAE "
                                 f"upsamples by {f}: the output is {h * f}x{w * f} (the image must be the output "
                                 f"size / {f}; resize it, or leave {name} out)")
        settings, inputs = self.prepare_call(prompt_ids, params, prng_seed, num_inference_steps, guidance_scale,
                                             h * f, w * f, latents, neg_prompt_ids, jit, mesh, return_trajectory,
                                             output_attentions)
        batch_shape = inputs["prompt_ids"].shape[:-1]
        inputs["image"] = self.check_image(image, batch_shape)
        inputs["noise_level"] = self.check_noise_level(noise_level, batch_shape)
        if low_res_noise is not None:
            noise = np.asarray(low_res_noise)
            if noise.dtype.kind != "f" or noise.shape != inputs["image"].shape or not np.all(np.isfinite(noise)):
                raise InputError(f"`low_res_noise` must be a finite float array shaped like the image "
                                 f"{tuple(inputs['image'].shape)}, got {noise.dtype} of shape {tuple(noise.shape)}")
            inputs["low_res_noise"] = jnp.asarray(noise, jnp.float32)
        outputs = self._run(settings, inputs, params, prng_seed, jit=jit, mesh=mesh)
        return self.finish(outputs, params, jit, decode_trajectory=decode_trajectory, check_finite=check_finite)

    def _low_res_size(self, image, jit: bool) -> tuple[int, int]:
        shape = np.shape(image)
        want = 5 if jit else 4
        if len(shape) != want:
            form = "[n_devices, per_device, 3, h, w]" if jit else "[batch, 3, h, w]"
            raise InputError(f"`image` must be {form} floats in [-1, 1] (pipe.prepare_inputs(prompts, images)"
                             f"{', then shard' if jit else ''}), got shape {tuple(shape)}")
        h, w = int(shape[-2]), int(shape[-1])
        multiple = self.size_multiple() // self.vae_scale_factor
        if h % multiple or w % multiple or h == 0 or w == 0:
            raise InputError(f"the low-resolution `image` is {h}x{w}; its sides must be positive multiples of "
                             f"{multiple} (the UNet's downsampling: the latents have the image's size)")
        return h, w


def low_res_images(image) -> np.ndarray:
    """PIL image(s) or arrays [h, w, 3] / [B, h, w, 3] (uint8 or floats in [0, 1]) -> float32 [B, 3, h, w] in [-1, 1]."""
    try:
        import PIL.Image
        pil = (PIL.Image.Image,)
    except ImportError:  # pragma: no cover
        pil = ()
    items = list(image) if isinstance(image, (list, tuple)) else [image]
    arrays = []
    for i, item in enumerate(items):
        if pil and isinstance(item, pil):
            item = np.asarray(item.convert("RGB"))
        arr = np.asarray(item)
        if arr.ndim == 3:
            arr = arr[None]
        if arr.ndim != 4 or arr.shape[-1] != 3:
            raise InputError(f"image {i}: expected [h, w, 3] or [B, h, w, 3] RGB (or a PIL image), got shape "
                             f"{tuple(arr.shape)}")
        if arr.dtype == np.uint8:
            arr = arr.astype(np.float32) / 255.0
        elif arr.dtype.kind == "f":
            if not np.all(np.isfinite(arr)) or arr.min() < 0 or arr.max() > 1:
                raise InputError(f"image {i}: float images must hold values in [0, 1] (uint8 in [0, 255])")
            arr = arr.astype(np.float32)
        else:
            raise InputError(f"image {i}: expected uint8 or float values, got {arr.dtype}")
        arrays.append(arr)
    shapes = {a.shape[1:] for a in arrays}
    if len(shapes) > 1:
        raise InputError(f"the images have different sizes {sorted(shapes)}: one call upscales images of one size")
    batch = np.concatenate(arrays)
    return (2.0 * batch - 1.0).transpose(0, 3, 1, 2).astype(np.float32)

