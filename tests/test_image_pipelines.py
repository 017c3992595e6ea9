"""Image-to-image, inpainting (9- and 4-channel UNets) and merging against diffusers' PyTorch pipelines.

The references' random draws are replaced by the same numbers sdjax gets: the VAE posterior's mean on both
sides (sdjax `sample_posterior=False`; diffusers' `retrieve_latents` patched to the mode) and the initial noise
(diffusers' `randn_tensor` patched to return ours). Posterior sampling itself is checked separately."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdjax import InputError
from sdjax.pipelines import (FlaxStableDiffusionImg2ImgPipeline, FlaxStableDiffusionInpaintPipeline,
                             FlaxStableDiffusionMergePipeline)
from sdjax.pipelines.engine import run_jit
from sdjax.testing import build_tiny_pipeline, rel_err

PROMPTS = ["a photo of an astronaut riding a horse", "a red circle on the moon"]
STEPS = 10
GUIDANCE = 7.5
SIZE = 32
SCHEDULERS = {"ddim": "DDIMScheduler", "pndm": "PNDMScheduler", "euler": "EulerDiscreteScheduler",
              "dpm_solver_pp_2m": "DPMSolverMultistepScheduler"}
STRENGTHS = (0.3, 0.75, 1.0)


def smooth_images(n=2, seed=0):
    """Images with structure (gradients and a disc), float [n, H, W, 3] in [0, 1]."""
    y, x = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        c = rng.uniform(0.2, 0.8, 3)
        disc = ((x - rng.uniform(0.3, 0.7)) ** 2 + (y - rng.uniform(0.3, 0.7)) ** 2 < 0.05)[..., None]
        out.append(np.clip(c * (0.5 + 0.5 * x[..., None]) + 0.3 * disc * (1 - c), 0, 1))
    return np.stack(out).astype(np.float32)


def square_masks(n=2):
    m = np.zeros((n, SIZE, SIZE, 1), np.float32)
    m[0, 8:24, 6:20] = 1
    m[-1, 4:16, 12:30] = 1
    return m


@pytest.fixture(scope="module")
def inpaint9_folder(tmp_path_factory):
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-inpaint9"), unet_overrides={"in_channels": 9})


@pytest.fixture(scope="module")
def img2img(tiny_pipeline):
    pipe, params = tiny_pipeline
    return FlaxStableDiffusionImg2ImgPipeline.from_pipe(pipe), params


def torch_reference(cls_name, folder, scheduler, monkeypatch, noise, **call):
    """Run a diffusers pipeline with our noise and the posterior mean; returns (images, per-step latents)."""
    import diffusers
    import torch
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as i2i
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_inpaint as inp

    for module in (i2i, inp):
        monkeypatch.setattr(module, "retrieve_latents", lambda out, generator=None, sample_mode="sample":
                            out.latent_dist.mode())
        monkeypatch.setattr(module, "randn_tensor", lambda shape, **kw: torch.from_numpy(np.asarray(noise)).reshape(shape))
    pipe = getattr(diffusers, cls_name).from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    extra = {"algorithm_type": "dpmsolver++", "solver_order": 2} if scheduler == "dpm_solver_pp_2m" else {}
    pipe.scheduler = getattr(diffusers, SCHEDULERS[scheduler]).from_config(pipe.scheduler.config, **extra)
    steps = []

    def keep(p, i, t, kw):
        steps.append(kw["latents"].detach().numpy().copy())
        return kw

    with torch.no_grad():
        out = pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="np",
                   callback_on_step_end=keep, **call)
    return out.images, np.stack(steps)


def report(name, images, ref_images, traj, ref_steps):
    n = ref_steps.shape[0]
    assert traj.latents.shape[0] == n + 1, (traj.latents.shape, n)
    image_err = float(np.abs(np.asarray(images) - ref_images).max())
    step_err = max(rel_err(traj.latents[i + 1], ref_steps[i]) for i in range(n))
    print(f"\n[{name}] {n} steps run; final image max abs err {image_err:.2e}; per-step latents max rel err {step_err:.2e}")
    assert image_err <= 2e-3
    assert step_err <= 1e-3
    return image_err, step_err


@pytest.mark.parity
@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_img2img_parity(img2img, tiny_folder, scheduler, monkeypatch):
    import torch

    pipe, params = img2img
    pipe = pipe.with_scheduler(scheduler)
    images = smooth_images()
    ids, image = pipe.prepare_inputs(PROMPTS, images)
    noise = np.asarray(jax.random.normal(jax.random.PRNGKey(3), (2, 4, SIZE // 2, SIZE // 2)), np.float32)
    for strength in STRENGTHS:
        ref_images, ref_steps = torch_reference("StableDiffusionImg2ImgPipeline", tiny_folder, scheduler, monkeypatch,
                                                noise, image=torch.from_numpy(image), strength=strength)
        out = pipe(ids, image, params, jax.random.PRNGKey(0), strength=strength, num_inference_steps=STEPS,
                   guidance_scale=GUIDANCE, noise=noise, sample_posterior=False)
        report(f"img2img {scheduler} strength {strength}", out.images, ref_images, out.trajectory, ref_steps)


@pytest.mark.parity
@pytest.mark.parametrize("channels", [9, 4])
@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_inpaint_parity(tiny_pipeline, tiny_folder, inpaint9_folder, channels, scheduler, monkeypatch):
    import torch

    folder = inpaint9_folder if channels == 9 else tiny_folder
    if channels == 9:
        pipe, params = FlaxStableDiffusionInpaintPipeline.from_pretrained(folder, scheduler=scheduler)
    else:
        base, params = tiny_pipeline
        pipe = FlaxStableDiffusionInpaintPipeline.from_pipe(base, scheduler=scheduler)
    assert pipe.uses_mask_channels == (channels == 9)
    images, masks = smooth_images(), square_masks()
    ids, masked_image, mask = pipe.prepare_inputs(PROMPTS, images, masks)
    image = pipe.prepare_images(images)
    noise = np.asarray(jax.random.normal(jax.random.PRNGKey(4), (2, 4, SIZE // 2, SIZE // 2)), np.float32)
    from PIL import Image

    pil_masks = [Image.fromarray((m[..., 0] * 255).astype(np.uint8)) for m in masks]
    for strength in STRENGTHS:
        ref_images, ref_steps = torch_reference(
            "StableDiffusionInpaintPipeline", folder, scheduler, monkeypatch, noise,
            image=torch.from_numpy(image), mask_image=pil_masks, strength=strength, height=SIZE, width=SIZE)
        out = pipe(ids, mask, masked_image, params, jax.random.PRNGKey(0), num_inference_steps=STEPS,
                   guidance_scale=GUIDANCE, strength=strength, image=image, noise=noise, sample_posterior=False)
        report(f"inpaint {channels}ch {scheduler} strength {strength}", out.images, ref_images, out.trajectory,
               ref_steps)
        if channels == 4:  # the known region is the image's own latents at the end
            known = np.asarray(mask)[:, :, ::2, ::2] < 0.5
            z0 = np.asarray(pipe.encode_images(params, jnp.asarray(image), jax.random.PRNGKey(0), False))
            np.testing.assert_allclose(np.asarray(out.trajectory.latents[-1])[np.broadcast_to(known, z0.shape)],
                                       z0[np.broadcast_to(known, z0.shape)], rtol=0, atol=1e-6)


def test_strength_is_traced_and_costs_only_the_steps_it_runs(img2img):
    pipe, params = img2img
    pipe = pipe.with_scheduler("ddim")
    ids, image = pipe.prepare_inputs(PROMPTS, smooth_images())
    kw = dict(num_inference_steps=8, guidance_scale=GUIDANCE)
    before = run_jit._cache_size()
    lengths = []
    for strength in (0.3, 0.75, 1.0):
        out = pipe(ids, image, params, jax.random.PRNGKey(0), strength=strength, **kw)
        lengths.append(out.trajectory.pred_original_samples.shape[0])
    assert run_jit._cache_size() == before + 1, "one program for every strength"
    assert lengths == [2, 6, 8]  # int(8 x strength) steps, as diffusers
    assert out.trajectory.timesteps.shape == (8,) and out.trajectory.latents.shape[0] == 9


def test_merge_weight_one_is_img2img_of_that_image(img2img):
    pipe, params = img2img
    images = smooth_images()
    ids, image = pipe.prepare_inputs(PROMPTS[:1], images[:1])
    kw = dict(strength=0.6, num_inference_steps=6, guidance_scale=GUIDANCE)
    reference = pipe(ids, image, params, jax.random.PRNGKey(5), **kw)
    merge = FlaxStableDiffusionMergePipeline.from_pipe(pipe)
    both = merge.prepare_images(images)
    for interpolation in ("linear", "slerp"):
        # the same numbers from another compiled program: equal to float rounding
        out = merge(ids, both, [1.0, 0.0], params, jax.random.PRNGKey(5), interpolation=interpolation, **kw)
        np.testing.assert_allclose(np.asarray(out.images), np.asarray(reference.images), atol=2e-5)
        assert rel_err(out.trajectory.latents, reference.trajectory.latents) < 1e-5
    halfway = pipe.merge(ids, both, [1, 1], params, jax.random.PRNGKey(5), **kw)
    assert not np.allclose(np.asarray(halfway.images), np.asarray(reference.images))


def test_slerp_keeps_the_norm_where_linear_shrinks_it():
    from sdjax.pipelines.image_to_image import combine_latents

    a, b = (jax.random.normal(jax.random.PRNGKey(k), (1, 4, 16, 16)) for k in (0, 1))
    w = jnp.array([[0.5, 0.5]])
    norm = lambda z: float(jnp.linalg.norm(z))
    lin, sph = combine_latents([a, b], w, "linear"), combine_latents([a, b], w, "slerp")
    assert norm(lin) / norm(a) == pytest.approx(1 / np.sqrt(2), rel=0.05)
    assert norm(sph) / norm(a) == pytest.approx(1.0, rel=0.05)
    three = combine_latents([a, b, a], jnp.array([[0.0, 1.0, 0.0]]), "slerp")
    np.testing.assert_allclose(three, b, atol=1e-5)


def test_posterior_sampling_draws_with_the_key(img2img):
    pipe, params = img2img
    image = jnp.asarray(pipe.prepare_images(smooth_images()))
    post = pipe.vae.apply({"params": params["vae"]}, image, method=pipe.vae.encode)
    key = jax.random.PRNGKey(9)
    sampled = pipe.encode_images(params, image, key, True)
    expected = (post.mean + post.std * jax.random.normal(key, post.mean.shape)) * pipe.vae.scaling_factor
    np.testing.assert_allclose(sampled, expected, rtol=1e-6)
    np.testing.assert_allclose(pipe.encode_images(params, image, key, False), post.mean * pipe.vae.scaling_factor)


@pytest.mark.slow
def test_pmap_and_mesh_match_single_device(img2img):
    from flax.jax_utils import replicate
    from flax.training.common_utils import shard
    from jax.sharding import Mesh

    pipe, params = img2img
    n = jax.local_device_count()
    images = np.concatenate([smooth_images(2, seed=s) for s in range(n // 2)])
    ids, image = pipe.prepare_inputs((PROMPTS * n)[:n], images)
    noise = np.asarray(jax.random.normal(jax.random.PRNGKey(2), (n, 4, SIZE // 2, SIZE // 2)), np.float32)
    kw = dict(strength=0.5, num_inference_steps=4, guidance_scale=GUIDANCE, noise=noise, sample_posterior=False)
    single = pipe(ids, image, params, jax.random.PRNGKey(0), **kw)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    meshed = pipe(ids, image, params, jax.random.PRNGKey(0), mesh=mesh, **kw)
    np.testing.assert_allclose(np.asarray(meshed.images), single.images, atol=1e-5)
    assert rel_err(meshed.trajectory.pred_original_samples, single.trajectory.pred_original_samples) <= 1e-5
    kw["noise"] = shard(noise)
    pmapped = pipe(shard(ids), shard(image), replicate(params), jax.random.split(jax.random.PRNGKey(0), n), jit=True,
                   **kw)
    np.testing.assert_allclose(np.asarray(pmapped.images).reshape(single.images.shape), single.images, atol=1e-5)
    assert pmapped.trajectory.latents.shape[:2] == (n, single.trajectory.latents.shape[0])
    # inpainting (4-channel: the blend runs inside the scan) on the mesh
    inpaint = FlaxStableDiffusionInpaintPipeline.from_pipe(pipe)
    ids, masked, mask = inpaint.prepare_inputs((PROMPTS * n)[:n], images, np.concatenate([square_masks()] * (n // 2)))
    kw = dict(num_inference_steps=4, guidance_scale=GUIDANCE, noise=noise, image=inpaint.prepare_images(images),
              sample_posterior=False)
    single = inpaint(ids, mask, masked, params, jax.random.PRNGKey(0), **kw)
    meshed = inpaint(ids, mask, masked, params, jax.random.PRNGKey(0), mesh=mesh, **kw)
    # per-device batch 1 vs 8 compiles differently: equal to float rounding (6 of 24576 values differ by 1.4e-5)
    np.testing.assert_allclose(np.asarray(meshed.images), single.images, atol=3e-5)


def test_bad_inputs(img2img, tiny_pipeline, inpaint9_folder):
    pipe, params = img2img
    images = smooth_images()
    ids, image = pipe.prepare_inputs(PROMPTS, images)
    key = jax.random.PRNGKey(0)
    for strength in (0.0, -0.5, 1.5, float("nan"), "a lot"):
        with pytest.raises(InputError, match="`strength` must"):
            pipe(ids, image, params, key, strength=strength, num_inference_steps=4)
    with pytest.raises(InputError, match="runs no step of 4"):
        pipe(ids, image, params, key, strength=0.2, num_inference_steps=4)
    with pytest.raises(InputError, match="sizes must be multiples of 4"):
        pipe(ids, np.zeros((2, 3, 30, 32), np.float32), params, key, num_inference_steps=4)
    with pytest.raises(InputError, match="`height` = 64, but the image is 32"):
        pipe(ids, image, params, key, height=64, num_inference_steps=4)
    with pytest.raises(InputError, match="must hold finite values in \\[-1, 1\\]"):
        pipe(ids, image * 255, params, key, num_inference_steps=4)
    with pytest.raises(InputError, match="different sizes"):
        pipe.prepare_inputs(PROMPTS, [images[0], np.zeros((16, 16, 3), np.float32)])
    rgba = np.concatenate([images, np.ones((2, SIZE, SIZE, 1), np.float32)], -1)
    np.testing.assert_allclose(pipe.prepare_images(rgba), image)  # RGBA (opaque) and grayscale are converted
    assert pipe.prepare_images(images[..., :1]).shape == (2, 3, SIZE, SIZE)
    inpaint = FlaxStableDiffusionInpaintPipeline.from_pipe(tiny_pipeline[0])
    with pytest.raises(InputError, match="mask must have its image's size"):
        inpaint.prepare_inputs(PROMPTS, images, np.zeros((2, 16, 16, 1), np.float32))
    with pytest.raises(InputError, match="must have one channel"):
        inpaint.prepare_inputs(PROMPTS, images, np.zeros((2, SIZE, SIZE, 3), np.float32))
    ids, masked, mask = inpaint.prepare_inputs(PROMPTS, images, square_masks())
    with pytest.raises(InputError, match="needed by a 4-channel UNet"):
        inpaint(ids, mask, masked, params, key, num_inference_steps=4)
    nine, params9 = FlaxStableDiffusionInpaintPipeline.from_pretrained(inpaint9_folder)
    with pytest.raises(InputError, match="needed when strength < 1"):
        nine(ids, mask, masked, params9, key, num_inference_steps=4, strength=0.5)
    nine(ids, mask, masked, params9, key, num_inference_steps=2)  # strength 1 needs no unmasked image
    from sdjax.errors import ConfigError

    with pytest.raises(ConfigError, match="inpainting needs a UNet with 4 input channels .* or 9"):
        FlaxStableDiffusionInpaintPipeline.from_pipe(tiny_pipeline[0], unet=nine.unet.clone(in_channels=5)) \
            .uses_mask_channels
    merge = FlaxStableDiffusionMergePipeline.from_pipe(pipe)
    two = merge.prepare_images(images)
    for weights, match in (([1.0, -1.0], "finite and >= 0"), ([0, 0], "must not sum to zero"),
                           ([1.0], "one number per image"), ([1.0, float("inf")], "finite")):
        with pytest.raises(InputError, match=match):
            merge(ids[:1], two, weights, params, key, num_inference_steps=4)
    with pytest.raises(InputError, match="`interpolation` must be one of"):
        merge(ids[:1], two, [1, 1], params, key, interpolation="cubic", num_inference_steps=4)
