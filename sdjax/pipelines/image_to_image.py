"""Image-to-image and image merging on the one engine: the denoising starts from an image's latents, noised to
the level of the step it starts at.

    pipe, params = FlaxStableDiffusionImg2ImgPipeline.from_pretrained(path, scheduler="ddim")
    prompt_ids, image = pipe.prepare_inputs(prompts, images)     # images: PIL, or float [B, H, W, 3] in [0, 1]
    out = pipe(prompt_ids, image, params, key, strength=0.8, num_inference_steps=50)
    out.trajectory                    # the steps actually run (about strength x num_inference_steps)

`strength` is traced: the compiled program has every step and skips the ones before the start (`lax.cond`),
so changing it never recompiles and a run costs only the steps it runs. The start follows diffusers'
`get_timesteps`: t_start = steps - min(int(steps * strength), steps), times the scheduler's order.

Merging (the DDPM paper's "interpolation", the visualization proposal's image merging): the latents of two
or more images, combined with weights — linearly, or spherically (slerp) — are noised and denoised like one
image. `FlaxStableDiffusionMergePipeline`, or `pipe.merge(...)`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from ..errors import InputError
from ..images import to_float_images, to_model_images
from .engine import Conditioning, Settings
from .stable_diffusion import FlaxStableDiffusionPipeline

INTERPOLATIONS = ("linear", "slerp")


@dataclasses.dataclass(frozen=True)
class ImageSettings(Settings):
    sample_posterior: bool = True  # the VAE posterior's sample (diffusers), or its mean


@dataclasses.dataclass(frozen=True)
class MergeSettings(ImageSettings):
    interpolation: str = "slerp"


class FlaxStableDiffusionImg2ImgPipeline(FlaxStableDiffusionPipeline):
    """Text-guided image-to-image (diffusers' StableDiffusionImg2ImgPipeline), trajectory and x̂0 included."""

    encodes_images = True

    # ------------------------------------------------------------------ inputs
    def prepare_inputs(self, prompt, image=None):
        """(prompt ids [B, 77], images NCHW in [-1, 1]) as diffusers' Flax img2img returned them; with only
        prompts, the ids (as the text-to-image pipeline)."""
        ids = super().prepare_inputs(prompt)
        if image is None:
            return ids
        return ids, self.prepare_images(image)

    def prepare_images(self, images, name: str = "image") -> np.ndarray:
        """PIL images or float [B, H, W, 3] in [0, 1] (grayscale, RGBA converted) -> NCHW float32 in [-1, 1]."""
        return to_model_images(to_float_images(images, name))

    def check_images(self, image, batch_shape: tuple, name: str = "image"):
        """NCHW images in [-1, 1] of a size the model takes, one per prompt (or one for all)."""
        arr = np.asarray(image)
        want = len(batch_shape) + 3
        if arr.dtype.kind != "f" or arr.ndim != want or arr.shape[-3] != 3:
            raise InputError(f"`{name}` must be float images [{'n_devices, per_device' if want == 5 else 'batch'}, "
                             f"3, H, W] in [-1, 1] (pipe.prepare_inputs), got {arr.dtype} of shape {tuple(arr.shape)}")
        if not np.all(np.isfinite(arr)) or arr.min() < -1.0001 or arr.max() > 1.0001:
            raise InputError(f"`{name}` must hold finite values in [-1, 1] (pipe.prepare_inputs makes them)")
        height, width = arr.shape[-2:]
        multiple = self.size_multiple()
        if height % multiple or width % multiple:
            raise InputError(f"`{name}` is {width}x{height} (WxH); sizes must be multiples of {multiple} (the VAE "
                             f"factor {self.vae_scale_factor} x the UNet's downsampling): resize or crop it")
        if arr.shape[:len(batch_shape)] != tuple(batch_shape):
            if arr.shape[:len(batch_shape)] == (1,) * len(batch_shape):
                arr = np.broadcast_to(arr, tuple(batch_shape) + arr.shape[len(batch_shape):])
            else:
                raise InputError(f"`{name}` has {arr.shape[:len(batch_shape)]} images for prompt_ids' "
                                 f"{tuple(batch_shape)}: one image per prompt, or one for all")
        return jnp.asarray(arr, jnp.float32), int(height), int(width)

    def check_strength(self, strength, num_inference_steps: int, name: str = "strength") -> int:
        """A number in (0, 1] -> the first model call to run (some step must run)."""
        try:
            s = float(np.asarray(strength))
        except (TypeError, ValueError):
            raise InputError(f"`{name}` must be a number in (0, 1], got {strength!r}") from None
        if not 0 < s <= 1:
            raise InputError(f"`{name}` must be in (0, 1], got {strength!r}")
        start = self.scheduler.start_index(num_inference_steps, s)
        if int(num_inference_steps * s) < 1:  # diffusers' check: no step would be left
            raise InputError(f"`{name}` = {s} runs no step of {num_inference_steps} (int({num_inference_steps} x "
                             f"{s}) = 0): use a larger strength or more steps")
        self.scheduler.check_start(start)
        return start

    # ------------------------------------------------------------------ the computation (traced)
    def encode_images(self, params, images, key, sample_posterior: bool = True):
        """NCHW images in [-1, 1] -> scaled latents: the posterior's sample drawn with `key` (diffusers), or its mean."""
        posterior = self.vae.apply({"params": params["vae"]}, images.astype(self.dtype), method=self.vae.encode)
        z = posterior.sample(key) if sample_posterior else posterior.mode()
        return z.astype(jnp.float32) * self.vae.scaling_factor

    def image_latents(self, settings, inputs, params, key):
        return self.encode_images(params, inputs["image"], jax.random.fold_in(key, 0), settings.sample_posterior)

    def condition(self, settings, inputs, params, state, noise_key) -> Conditioning:
        start = inputs["start"][0]
        image_key, draw_key = jax.random.split(noise_key)
        z0 = self.image_latents(settings, inputs, params, image_key)
        noise = inputs.get("noise")
        if noise is None:
            noise = jax.random.normal(draw_key, z0.shape, jnp.float32)
        return Conditioning(latents=self.scheduler.add_noise_at_step(state, z0, noise, start), start=start)

    # ------------------------------------------------------------------ the call
    def __call__(self, prompt_ids, image, params, prng_seed, strength: float = 0.8, num_inference_steps: int = 50,
                 height: int | None = None, width: int | None = None, guidance_scale: float | jax.Array = 7.5,
                 noise=None, neg_prompt_ids=None, jit: bool = False, return_trajectory: bool = True,
                 decode_trajectory: bool = False, output_attentions: bool = False, mesh: Mesh | None = None,
                 check_finite: bool = True, sample_posterior: bool = True):
        """Denoise `image` (NCHW in [-1, 1], from prepare_inputs) toward the prompts from `strength` x the steps.

        noise: the Gaussian noise added to the image's latents ([B, C, h, w]; default: drawn from prng_seed).
        height/width: must equal the image's (default: the image's). Other arguments as the text-to-image call."""
        settings, inputs, start = self.prepare_image_call(
            prompt_ids, image, params, prng_seed, strength, num_inference_steps, height, width, guidance_scale,
            noise, neg_prompt_ids, jit, mesh, return_trajectory, output_attentions, sample_posterior)
        outputs = self._run(settings, inputs, params, prng_seed, jit=jit, mesh=mesh)
        return self.finish(outputs, params, jit, start=start, decode_trajectory=decode_trajectory,
                           check_finite=check_finite)

    def prepare_image_call(self, prompt_ids, image, params, prng_seed, strength, num_inference_steps, height, width,
                           guidance_scale, noise, neg_prompt_ids, jit, mesh, return_trajectory, output_attentions,
                           sample_posterior, settings_cls=ImageSettings, image_name: str = "image", **settings_extra):
        """The text-to-image checks, plus the image(s), strength and noise: (settings, inputs, first call)."""
        batch_shape = self.prompt_batch_shape(prompt_ids)
        image, img_h, img_w = self.check_images(image, batch_shape, image_name)
        for name, given, actual in (("height", height, img_h), ("width", width, img_w)):
            if given is not None and given != actual:
                raise InputError(f"`{name}` = {given}, but the {image_name} is {actual}: the output has the image's size")
        settings, inputs = self.prepare_call(prompt_ids, params, prng_seed, num_inference_steps, guidance_scale,
                                             img_h, img_w, None, neg_prompt_ids, jit, mesh, return_trajectory,
                                             output_attentions)
        start = self.check_strength(strength, settings.num_inference_steps)
        inputs[image_name] = image
        inputs["start"] = jnp.full(batch_shape, start, jnp.int32)
        if noise is not None:
            inputs["noise"] = self.check_latents(noise, batch_shape + self.latent_shape(1, img_h, img_w)[1:], "noise")
        settings = settings_cls(**dataclasses.asdict(settings), sample_posterior=bool(sample_posterior),
                                **settings_extra)
        return settings, inputs, start

    def merge(self, prompt_ids, images, weights, params, prng_seed, **kwargs):
        """`FlaxStableDiffusionMergePipeline` over these modules: see its `__call__`."""
        return FlaxStableDiffusionMergePipeline.from_pipe(self)(prompt_ids, images, weights, params, prng_seed,
                                                                **kwargs)


class FlaxStableDiffusionMergePipeline(FlaxStableDiffusionImg2ImgPipeline):
    """Image merging: the weighted combination of two or more images' latents, denoised toward a prompt.

    A linear mix of independent Gaussian-like latents has a smaller norm than its parts (two halves: about
    1/sqrt(2)), which the denoiser reads as a blurrier, lower-contrast image; spherical interpolation (slerp)
    keeps the norm (docs/merging.md shows both)."""

    def prepare_inputs(self, prompt, images=None):
        """(prompt ids [B, 77], images [K, 3, H, W] in [-1, 1]): the K images merged into every prompt's image."""
        ids = FlaxStableDiffusionPipeline.prepare_inputs(self, prompt)
        if images is None:
            return ids
        return ids, self.prepare_images(images, "images")

    @staticmethod
    def check_weights(weights, k: int) -> np.ndarray:
        w = np.asarray(weights, np.float64)
        if w.shape != (k,):
            raise InputError(f"`weights` must be one number per image ({k}), got shape {w.shape}")
        if not np.all(np.isfinite(w)) or np.any(w < 0):
            raise InputError(f"`weights` must be finite and >= 0, got {w.tolist()}")
        if w.sum() <= 0:
            raise InputError(f"`weights` must not sum to zero, got {w.tolist()}")
        return (w / w.sum()).astype(np.float32)

    def image_latents(self, settings, inputs, params, key):
        images, weights = inputs["images"], inputs["weights"]  # [B, K, 3, H, W], [B, K]
        # image k's latents with the key img2img uses for its image (k = 0): weights (1, 0, ...) are img2img of image 0
        zs = [self.encode_images(params, images[:, k], jax.random.fold_in(key, k), settings.sample_posterior)
              for k in range(images.shape[1])]
        return combine_latents(zs, weights, settings.interpolation)

    def __call__(self, prompt_ids, images, weights, params, prng_seed, strength: float = 0.8,
                 interpolation: str = "slerp", **kwargs):
        """Merge `images` ([K, 3, H, W] in [-1, 1], the same for every prompt) with `weights` (K numbers >= 0,
        normalised to sum 1) and denoise from `strength` toward the prompts. Other arguments as img2img's."""
        if interpolation not in INTERPOLATIONS:
            raise InputError(f"`interpolation` must be one of {', '.join(INTERPOLATIONS)}, got {interpolation!r}")
        images = np.asarray(images)
        if images.ndim != 4:
            raise InputError(f"`images` must be [K, 3, H, W] (K >= 1 images to merge), got shape {images.shape}")
        w = self.check_weights(weights, images.shape[0])
        batch_shape = self.prompt_batch_shape(prompt_ids)
        opts = dict(num_inference_steps=50, height=None, width=None, guidance_scale=7.5, noise=None,
                    neg_prompt_ids=None, jit=False, return_trajectory=True, decode_trajectory=False,
                    output_attentions=False, mesh=None, check_finite=True, sample_posterior=True)
        unknown = set(kwargs) - set(opts)
        if unknown:
            raise TypeError(f"unknown argument(s) {sorted(unknown)}")
        opts.update(kwargs)
        decode, check = opts.pop("decode_trajectory"), opts.pop("check_finite")
        # every prompt gets the same K images: [*batch, K, 3, H, W]
        per_prompt = np.broadcast_to(images, tuple(batch_shape) + images.shape)
        settings, inputs, start = self.prepare_image_call(
            prompt_ids, per_prompt[..., 0, :, :, :], params, prng_seed, strength, opts["num_inference_steps"],
            opts["height"], opts["width"], opts["guidance_scale"], opts["noise"], opts["neg_prompt_ids"], opts["jit"],
            opts["mesh"], opts["return_trajectory"], opts["output_attentions"], opts["sample_posterior"],
            settings_cls=MergeSettings, interpolation=interpolation)
        del inputs["image"]
        inputs["images"] = jnp.asarray(per_prompt, jnp.float32)
        inputs["weights"] = jnp.asarray(np.broadcast_to(w, tuple(batch_shape) + w.shape))
        outputs = self._run(settings, inputs, params, prng_seed, jit=opts["jit"], mesh=opts["mesh"])
        return self.finish(outputs, params, opts["jit"], start=start, decode_trajectory=decode, check_finite=check)


def slerp(a, b, t):
    """Spherical interpolation between a and b ([B, ...]) at t ([B]): the angle between them is covered at a
    constant rate and the norm goes from |a| to |b| linearly. Nearly parallel inputs fall back to linear."""
    flat_a, flat_b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    na, nb = jnp.linalg.norm(flat_a, axis=1), jnp.linalg.norm(flat_b, axis=1)
    cos = jnp.sum(flat_a * flat_b, axis=1) / jnp.maximum(na * nb, 1e-12)
    theta = jnp.arccos(jnp.clip(cos, -1.0, 1.0))
    sin = jnp.sin(theta)
    parallel = sin < 1e-6
    safe = jnp.where(parallel, 1.0, sin)
    ca = jnp.where(parallel, 1.0 - t, jnp.sin((1.0 - t) * theta) / safe)
    cb = jnp.where(parallel, t, jnp.sin(t * theta) / safe)
    shape = (-1,) + (1,) * (a.ndim - 1)
    return ca.reshape(shape) * a + cb.reshape(shape) * b


def combine_latents(zs, weights, interpolation: str):
    """Weighted combination of K latents [B, C, h, w] with weights [B, K] summing to 1: linear, or slerp applied
    pairwise (z <- slerp(z, z_k, w_k / (w_0 + ... + w_k)), which for two images is exactly their slerp)."""
    if interpolation == "linear":
        return sum(weights[:, k].reshape(-1, 1, 1, 1) * z for k, z in enumerate(zs))
    out, acc = zs[0], weights[:, 0]
    for k in range(1, len(zs)):
        total = acc + weights[:, k]
        t = jnp.where(total > 0, weights[:, k] / jnp.where(total > 0, total, 1.0), 0.0)
        out = slerp(out, zs[k], t)
        acc = total
    return out
