"""Inpainting on the one engine: repaint the white region of a mask, keep the rest.

    pipe, params = FlaxStableDiffusionInpaintPipeline.from_pretrained(path)
    prompt_ids, masked_image, mask = pipe.prepare_inputs(prompts, images, masks)   # mask: white = repaint
    out = pipe(prompt_ids, mask, masked_image, params, key, num_inference_steps=50, image=images_for_4ch)

Both kinds of checkpoint, as diffusers' StableDiffusionInpaintPipeline:
* inpainting UNets (9 input channels, e.g. stable-diffusion-inpainting): the latents, the mask at latent
  resolution and the masked image's latents are the UNet's input;
* ordinary 4-channel UNets: after every step the known region is replaced by the image's latents noised to the
  next step's level, so the model only ever fills the hole (this needs the unmasked `image`).
`strength` as diffusers has it (default 1.0: start from pure noise; below 1 the image's latents, noised).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from ..errors import ConfigError, InputError
from ..images import to_float_images, to_masks, to_model_images, to_model_masks
from .engine import Conditioning
from .image_to_image import FlaxStableDiffusionImg2ImgPipeline


class FlaxStableDiffusionInpaintPipeline(FlaxStableDiffusionImg2ImgPipeline):
    """Text-guided inpainting with trajectory and x̂0 (diffusers' StableDiffusionInpaintPipeline)."""

    @property
    def uses_mask_channels(self) -> bool:
        """A 9-channel inpainting UNet (else a 4-channel one: the known region is blended back every step)."""
        latent = self.vae.latent_channels
        if self.unet.in_channels == 2 * latent + 1:
            return True
        if self.unet.in_channels == latent:
            return False
        raise ConfigError(f"inpainting needs a UNet with {latent} input channels (blending) or {2 * latent + 1} "
                          f"(latents, mask, masked-image latents); this one has {self.unet.in_channels}")

    def prepare_inputs(self, prompt, image=None, mask=None):
        """(prompt ids, masked images NCHW in [-1, 1], masks [B, 1, H, W] in {0, 1}), as diffusers' Flax inpaint
        pipeline returned them: masked image = image where the mask is black, 0 where it is white."""
        ids = FlaxStableDiffusionImg2ImgPipeline.prepare_inputs(self, prompt)
        if image is None and mask is None:
            return ids
        if image is None or mask is None:
            raise InputError("inpainting needs both `image` and `mask`")
        images = to_float_images(image, "image")
        masks = to_masks(mask, like=images, name="mask")
        model_images = to_model_images(images)
        model_masks = to_model_masks(masks)
        return ids, model_images * (model_masks < 0.5), model_masks

    def check_mask(self, mask, batch_shape: tuple, height: int, width: int):
        arr = np.asarray(mask)
        want = len(batch_shape) + 3
        if arr.dtype.kind != "f" or arr.ndim != want or arr.shape[-3] != 1:
            raise InputError(f"`mask` must be float masks [{'n_devices, per_device' if want == 5 else 'batch'}, 1, "
                             f"H, W] (pipe.prepare_inputs), got {arr.dtype} of shape {tuple(arr.shape)}")
        if arr.shape[-2:] != (height, width):
            raise InputError(f"`mask` is {arr.shape[-1]}x{arr.shape[-2]} (WxH), the image {width}x{height}: "
                             "a mask must have its image's size")
        if arr.shape[:len(batch_shape)] == (1,) * len(batch_shape):
            arr = np.broadcast_to(arr, tuple(batch_shape) + arr.shape[len(batch_shape):])
        elif arr.shape[:len(batch_shape)] != tuple(batch_shape):
            raise InputError(f"`mask` has {arr.shape[:len(batch_shape)]} masks for {tuple(batch_shape)} prompts")
        return jnp.asarray((arr >= 0.5).astype(np.float32))

    # ------------------------------------------------------------------ the computation (traced)
    def condition(self, settings, inputs, params, state, noise_key) -> Conditioning:
        start = inputs["start"][0]
        image_key, draw_key = jax.random.split(noise_key)
        f = self.vae_scale_factor
        mask = inputs["mask"][:, :, ::f, ::f]  # diffusers: F.interpolate(mask, size=(h / f, w / f)), nearest
        batch = inputs["prompt_ids"].shape[0]
        shape = self.latent_shape(batch, settings.height, settings.width)
        noise = inputs.get("noise")
        if noise is None:
            noise = jax.random.normal(draw_key, shape, jnp.float32)
        z0 = None
        if "image" in inputs:  # the unmasked image: strength < 1 starts from it; a 4-channel UNet blends it back
            z0 = self.encode_images(params, inputs["image"], jax.random.fold_in(image_key, 0), settings.sample_posterior)
        latents = noise * self.scheduler.init_noise_sigma(state)  # strength 1: pure noise (diffusers' is_strength_max)
        if z0 is not None:
            latents = jnp.where(inputs["full_strength"][0], latents,
                                self.scheduler.add_noise_at_step(state, z0, noise, start))
        if self.uses_mask_channels:
            masked = self.encode_images(params, inputs["masked_image"], jax.random.fold_in(image_key, 1),
                                        settings.sample_posterior)
            return Conditioning(latents=latents, start=start, extra_channels=jnp.concatenate([mask, masked], axis=1))
        n_calls = self.scheduler.num_model_calls(state)

        def keep_known_region(sample, x0, i):
            # the image's latents at the next call's noise level (clean after the last), outside the mask
            known = jnp.where(i + 1 < n_calls,
                              self.scheduler.add_noise_at_step(state, z0, noise, jnp.minimum(i + 1, n_calls - 1)), z0)
            return (1.0 - mask) * known + mask * sample

        return Conditioning(latents=latents, start=start, post_step=keep_known_region)

    # ------------------------------------------------------------------ the call
    def __call__(self, prompt_ids, mask, masked_image, params, prng_seed, num_inference_steps: int = 50,
                 height: int | None = None, width: int | None = None, guidance_scale: float | jax.Array = 7.5,
                 latents=None, neg_prompt_ids=None, jit: bool = False, return_trajectory: bool = True,
                 decode_trajectory: bool = False, output_attentions: bool = False, mesh: Mesh | None = None,
                 check_finite: bool = True, strength: float = 1.0, image=None, noise=None,
                 sample_posterior: bool = True):
        """Repaint the white region of `mask` toward the prompts.

        mask [B, 1, H, W] and masked_image [B, 3, H, W] as prepare_inputs makes them. image: the unmasked image
        (NCHW in [-1, 1], `prepare_images`), needed by 4-channel UNets and by strength < 1. latents: the initial
        noise (diffusers' `latents`, scaled by the scheduler's init sigma); noise: the same as `latents` for
        strength < 1 (the noise added to the image). Other arguments as img2img's."""
        four = not self.uses_mask_channels
        full = float(np.asarray(strength)) == 1.0 if np.ndim(strength) == 0 else False
        if image is None and (four or not full):
            raise InputError("`image` (the unmasked image, pipe.prepare_images) is needed "
                             + ("by a 4-channel UNet: it blends the known region back at every step"
                                if four else "when strength < 1: the denoising starts from it"))
        if latents is not None and noise is not None:
            raise InputError("give `latents` or `noise`, not both (they are the same noise)")
        settings, inputs, start = self.prepare_image_call(
            prompt_ids, masked_image, params, prng_seed, strength, num_inference_steps, height, width, guidance_scale,
            latents if latents is not None else noise, neg_prompt_ids, jit, mesh, return_trajectory,
            output_attentions, sample_posterior, image_name="masked_image")
        batch_shape = np.shape(prompt_ids)[:-1]
        inputs["mask"] = self.check_mask(mask, batch_shape, settings.height, settings.width)
        if image is not None:
            inputs["image"], h, w = self.check_images(image, batch_shape, "image")
            if (h, w) != (settings.height, settings.width):
                raise InputError(f"`image` is {w}x{h}, `masked_image` {settings.width}x{settings.height}: one size")
        inputs["full_strength"] = jnp.full(batch_shape, full)
        outputs = self._run(settings, inputs, params, prng_seed, jit=jit, mesh=mesh)
        return self.finish(outputs, params, jit, start=start, decode_trajectory=decode_trajectory,
                           check_finite=check_finite)
