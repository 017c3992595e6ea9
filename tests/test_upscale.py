"""FlaxStableDiffusionUpscalePipeline against diffusers' PyTorch StableDiffusionUpscalePipeline (a tiny random x4
upscaler folder), plus compile, sharding, saving and bad-input checks."""

import json
import shutil

import jax
import numpy as np
import pytest

from sdjax import ConfigError, FlaxStableDiffusionPipeline, FlaxStableDiffusionUpscalePipeline, InputError
from sdjax.testing import rel_err

PROMPTS = ["a photo of an astronaut riding a horse", "a red circle on the moon"]
LOW = 16  # low-resolution side; latents 16x16, images 64x64 (VAE factor 4)
STEPS = 6
GUIDANCE = 7.5
TORCH_SCHEDULERS = {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from tests.conftest import HAVE_REFERENCE, NO_REFERENCE

    if not HAVE_REFERENCE:
        pytest.skip(NO_REFERENCE)
    from sdjax.testing import build_tiny_upscaler

    return build_tiny_upscaler(tmp_path_factory.mktemp("tiny-upscaler"))


@pytest.fixture(scope="module")
def loaded(folder):
    return FlaxStableDiffusionUpscalePipeline.from_pretrained(folder)


def low_res(batch=len(PROMPTS), seed=0):
    return np.random.default_rng(seed).uniform(0, 1, (batch, LOW, LOW, 3)).astype(np.float32)


def latents(batch=len(PROMPTS), seed=0):
    return np.random.default_rng(seed + 100).standard_normal((batch, 4, LOW, LOW)).astype(np.float32)


def torch_low_res_noise(batch=len(PROMPTS), seed=0):
    """The noise diffusers draws for the low-resolution image: its first draw from generator `seed`."""
    import torch

    return torch.randn((batch, 3, LOW, LOW), generator=torch.Generator().manual_seed(seed)).numpy()


@pytest.fixture(scope="module")
def torch_pipe(folder):
    from diffusers import StableDiffusionUpscalePipeline

    pipe = StableDiffusionUpscalePipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_torch(torch_pipe, scheduler, noise_level, steps=STEPS):
    import diffusers
    import torch

    torch_pipe.scheduler = getattr(diffusers, TORCH_SCHEDULERS[scheduler]).from_config(torch_pipe.scheduler.config)
    kept = []
    with torch.no_grad():
        out = torch_pipe(PROMPTS, image=low_res(), num_inference_steps=steps, guidance_scale=GUIDANCE,
                         noise_level=noise_level, generator=torch.Generator().manual_seed(0),
                         latents=torch.from_numpy(latents()), output_type="np",
                         callback=lambda i, t, lat: kept.append(lat.numpy().copy()), callback_steps=1)
    return out.images, np.stack(kept)


@pytest.mark.parity
@pytest.mark.parametrize("scheduler", list(TORCH_SCHEDULERS))
@pytest.mark.parametrize("noise_level", [20, 100])
def test_parity_with_diffusers_upscale_pipeline(loaded, torch_pipe, scheduler, noise_level):
    pipe, params = loaded
    pipe = pipe.with_scheduler(scheduler)
    ref_images, ref_steps = run_torch(torch_pipe, scheduler, noise_level)
    ids, image = pipe.prepare_inputs(PROMPTS, low_res())
    out = pipe(ids, image, params, jax.random.PRNGKey(0), num_inference_steps=STEPS, guidance_scale=GUIDANCE,
               noise_level=noise_level, latents=latents(), low_res_noise=torch_low_res_noise())
    traj = out.trajectory
    n = ref_steps.shape[0]
    assert out.images.shape == ref_images.shape == (2, LOW * 4, LOW * 4, 3)
    assert traj.latents.shape == (n + 1, 2, 4, LOW, LOW) and traj.pred_original_samples.shape == (n, 2, 4, LOW, LOW)
    image_err = float(np.abs(np.asarray(out.images) - ref_images).max())
    step_err = max(rel_err(traj.latents[i + 1], ref_steps[i]) for i in range(n))
    print(f"\n[{scheduler}, noise_level {noise_level}] final image max abs err {image_err:.2e}; "
          f"per-step latents max rel err {step_err:.2e}")
    assert image_err <= 1e-4
    assert step_err <= 1e-4


def test_noise_level_is_traced_and_does_not_recompile(loaded):
    from sdjax.pipelines.engine import run_jit

    pipe, params = loaded
    ids, image = pipe.prepare_inputs(PROMPTS, low_res())
    kw = dict(num_inference_steps=3, guidance_scale=GUIDANCE, latents=latents(), return_trajectory=False)
    before = run_jit._cache_size()
    a = pipe(ids, image, params, jax.random.PRNGKey(0), noise_level=20, **kw).images
    size = run_jit._cache_size()
    assert size == before + 1
    b = pipe(ids, image, params, jax.random.PRNGKey(0), noise_level=300, **kw).images
    c = pipe(ids, image, params, jax.random.PRNGKey(0), noise_level=np.array([0, 350]), **kw).images
    assert run_jit._cache_size() == size, "changing noise_level must not compile another program"
    assert rel_err(a, b) > 1e-3  # and it is used
    # one per image: image 1 at 350 is not image 1 at 20; drawing the low-res noise from the key is deterministic
    assert rel_err(c[1], a[1]) > 1e-3
    again = pipe(ids, image, params, jax.random.PRNGKey(0), noise_level=20, **kw).images
    np.testing.assert_array_equal(np.asarray(again), np.asarray(a))


def test_one_image_for_all_prompts_and_pil(loaded):
    from PIL import Image

    pipe, _ = loaded
    pil = Image.fromarray((low_res(1)[0] * 255).round().astype(np.uint8))
    ids, image = pipe.prepare_inputs(PROMPTS, pil)
    assert ids.shape == (2, 77) and image.shape == (2, 3, LOW, LOW) and image.dtype == np.float32
    assert -1 <= image.min() and image.max() <= 1
    np.testing.assert_array_equal(image[0], image[1])


@pytest.mark.slow
def test_pmap_and_mesh_match_single_device(loaded):
    from flax.jax_utils import replicate
    from flax.training.common_utils import shard
    from jax.sharding import Mesh

    pipe, params = loaded
    n = jax.local_device_count()
    assert n >= 4, "conftest sets 8 host CPU devices"
    ids, image = pipe.prepare_inputs((PROMPTS * n)[:n], low_res(n))
    lat, noise = latents(n), np.random.default_rng(5).standard_normal((n, 3, LOW, LOW)).astype(np.float32)
    levels = np.arange(n) * 40
    kw = dict(num_inference_steps=3, guidance_scale=GUIDANCE)
    single = pipe(ids, image, params, jax.random.PRNGKey(0), noise_level=levels, latents=lat, low_res_noise=noise, **kw)
    rngs = jax.random.split(jax.random.PRNGKey(0), n)
    pmapped = pipe(shard(ids), shard(image), replicate(params), rngs, noise_level=shard(levels), latents=shard(lat),
                   low_res_noise=shard(noise), jit=True, **kw)
    assert pmapped.images.shape == (n, 1, LOW * 4, LOW * 4, 3)
    # per-device batch 1 vs batch n compiles differently: equal up to float rounding (measured 1.03e-5 at most)
    np.testing.assert_allclose(np.asarray(pmapped.images).reshape(single.images.shape), single.images, atol=3e-5)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    meshed = pipe(ids, image, params, jax.random.PRNGKey(0), noise_level=levels, latents=lat, low_res_noise=noise,
                  mesh=mesh, **kw)
    np.testing.assert_allclose(np.asarray(meshed.images), single.images, atol=3e-5)
    assert rel_err(meshed.trajectory.pred_original_samples, single.trajectory.pred_original_samples) <= 1e-5
    assert len(meshed.images.sharding.device_set) == n


def test_bad_inputs(loaded):
    pipe, params = loaded
    ids, image = pipe.prepare_inputs(PROMPTS, low_res())
    key = jax.random.PRNGKey(0)
    kw = dict(num_inference_steps=2)
    with pytest.raises(InputError, match=r"`height` = 32, but the low-resolution image is 16x16 .* the output is 64x64"):
        pipe(ids, image, params, key, height=32, **kw)
    with pytest.raises(InputError, match="sides must be positive multiples of 4"):
        pipe(ids, image[:, :, :6, :6], params, key, **kw)
    with pytest.raises(InputError, match=r"`image` must be float \[2, 3, h, w\]"):
        pipe(ids, image[:1], params, key, **kw)
    with pytest.raises(InputError, match=r"`image` must be \[batch, 3, h, w\]"):
        pipe(ids, image[0], params, key, **kw)
    with pytest.raises(InputError, match=r"values in \[-1, 1\]"):
        pipe(ids, image * 255, params, key, **kw)
    with pytest.raises(InputError, match=r"`noise_level` must be in \[0, 350\]"):
        pipe(ids, image, params, key, noise_level=351, **kw)
    with pytest.raises(InputError, match=r"`noise_level` must be in \[0, 350\]"):
        pipe(ids, image, params, key, noise_level=-1, **kw)
    with pytest.raises(InputError, match="`noise_level` must be an integer"):
        pipe(ids, image, params, key, noise_level=20.5, **kw)
    with pytest.raises(InputError, match="`noise_level` has shape"):
        pipe(ids, image, params, key, noise_level=[1, 2, 3], **kw)
    with pytest.raises(InputError, match="`low_res_noise` must be"):
        pipe(ids, image, params, key, low_res_noise=np.zeros((2, 3, 8, 8), np.float32), **kw)
    with pytest.raises(InputError, match="needs the low-resolution image"):
        pipe.prepare_inputs(PROMPTS)
    with pytest.raises(InputError, match="2 prompt\\(s\\) and 3 image\\(s\\)"):
        pipe.prepare_inputs(PROMPTS, low_res(3))
    with pytest.raises(InputError, match="different sizes"):
        pipe.prepare_inputs(PROMPTS, [low_res(1)[0], low_res(1)[0][:8, :8]])
    with pytest.raises(InputError, match=r"float images must hold values in \[0, 1\]"):
        pipe.prepare_inputs(PROMPTS, low_res() * 255)


def test_folder_errors(folder, tmp_path, tiny_folder):
    broken = tmp_path / "no-low-res"
    shutil.copytree(folder, broken)
    shutil.rmtree(broken / "low_res_scheduler")
    with pytest.raises(ConfigError, match="no low_res_scheduler/scheduler_config.json"):
        FlaxStableDiffusionUpscalePipeline.from_pretrained(broken)
    index = json.loads((broken / "model_index.json").read_text())
    del index["low_res_scheduler"]
    (broken / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ConfigError, match="has no low_res_scheduler component"):
        FlaxStableDiffusionUpscalePipeline.from_pretrained(broken)
    # a text-to-image folder is not an upscaler, and an upscaler is not a text-to-image model
    with pytest.raises(ConfigError, match="has no low_res_scheduler component"):
        FlaxStableDiffusionUpscalePipeline.from_pretrained(tiny_folder)
    with pytest.raises(ConfigError, match=r"components \['low_res_scheduler'\] are not run"):
        FlaxStableDiffusionPipeline.from_pretrained(folder)
    # a low_res_scheduler that is not DDPM
    other = tmp_path / "euler-low-res"
    shutil.copytree(folder, other)
    cfg_path = other / "low_res_scheduler" / "scheduler_config.json"
    cfg_path.write_text(json.dumps(json.loads(cfg_path.read_text()) | {"_class_name": "EulerDiscreteScheduler"}))
    with pytest.raises(ConfigError, match="low_res_scheduler must be a DDPMScheduler"):
        FlaxStableDiffusionUpscalePipeline.from_pretrained(other)


@pytest.mark.parity
def test_save_pretrained_loads_in_diffusers(loaded, tmp_path):
    import torch
    from diffusers import StableDiffusionUpscalePipeline

    pipe, params = loaded
    pipe.save_pretrained(tmp_path / "saved", params)
    again, params2 = FlaxStableDiffusionUpscalePipeline.from_pretrained(tmp_path / "saved")
    assert (again.unet, again.vae, again.max_noise_level) == (pipe.unet, pipe.vae, 350)
    assert again.scheduler.name == "ddim" and again.low_res_scheduler.config["beta_end"] == 0.02
    torch_pipe = StableDiffusionUpscalePipeline.from_pretrained(tmp_path / "saved")
    torch_pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        ref = torch_pipe(PROMPTS, image=low_res(), num_inference_steps=3, guidance_scale=GUIDANCE, noise_level=50,
                         generator=torch.Generator().manual_seed(0), latents=torch.from_numpy(latents()),
                         output_type="np").images
    ids, image = again.prepare_inputs(PROMPTS, low_res())
    out = again(ids, image, params2, jax.random.PRNGKey(0), num_inference_steps=3, guidance_scale=GUIDANCE,
                noise_level=50, latents=latents(), low_res_noise=torch_low_res_noise(), return_trajectory=False)
    assert np.abs(np.asarray(out.images) - ref).max() <= 1e-4


def test_scaling_factor_as_diffusers(folder, tmp_path, caplog):
    """diffusers' upscaler replaces any other VAE scaling factor by 0.08333; so does sdjax, with a warning."""
    other = tmp_path / "other-scale"
    shutil.copytree(folder, other)
    cfg_path = other / "vae" / "config.json"
    cfg_path.write_text(json.dumps(json.loads(cfg_path.read_text()) | {"scaling_factor": 0.18215}))
    with caplog.at_level("WARNING"):
        pipe, _ = FlaxStableDiffusionUpscalePipeline.from_pretrained(other)
    assert pipe.vae.scaling_factor == 0.08333
    assert "scaling_factor is 0.18215" in caplog.text


def test_float16_vae_decodes_in_float32(loaded):
    import jax.numpy as jnp

    pipe, params = loaded
    half = FlaxStableDiffusionUpscalePipeline.from_pipe(pipe, vae=pipe.vae.clone(dtype=jnp.float16))
    vae16 = jax.tree_util.tree_map(lambda p: p.astype(jnp.float16), params["vae"])
    lat = jnp.asarray(latents(1)) * 3
    expected = pipe.decode_latents(jax.tree_util.tree_map(lambda p: p.astype(jnp.float32), vae16), lat)
    np.testing.assert_allclose(np.asarray(half.decode_latents(vae16, lat)), np.asarray(expected), atol=1e-6)
