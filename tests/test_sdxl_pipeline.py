"""FlaxStableDiffusionXLPipeline / FlaxStableDiffusionXLImg2ImgPipeline against diffusers' PyTorch
StableDiffusionXLPipeline / StableDiffusionXLImg2ImgPipeline on tiny random folders (two text encoders and
both tokenizers for the base; text_encoder_2 only and the aesthetic score for the refiner).

The references' random draws are replaced by the numbers sdjax gets: the initial latents (text-to-image), the
noise added to the image's latents (`randn_tensor` patched) and the VAE posterior's mean (`retrieve_latents`
patched; sdjax sample_posterior=False)."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdjax import ConfigError, FlaxStableDiffusionXLImg2ImgPipeline, FlaxStableDiffusionXLPipeline, InputError
from sdjax.pipelines import FlaxStableDiffusionPipeline, load_pipeline
from sdjax.pipelines.engine import run_jit
from sdjax.testing import rel_err

pytestmark = pytest.mark.parity

PROMPTS = ["a photo of an astronaut riding a horse", "a red circle on the moon"]
NEGATIVE = ["a blue square", "a dog"]
STEPS = 10
GUIDANCE = 5.0
SIZE = 32  # pixels; latents 16x16 (VAE factor 2)
SCHEDULERS = {"euler": "EulerDiscreteScheduler", "ddim": "DDIMScheduler",
              "dpm_solver_pp_2m": "DPMSolverMultistepScheduler"}
# base text-to-image: each scheduler also exercises a different part of the conditioning
TEXT2IMG_CASES = {
    # force_zeros_for_empty_prompt (no negative prompt): zero unconditional embeddings; default time ids
    "euler": dict(),
    # micro-conditioning with its negative variants, guidance_rescale
    "ddim": dict(original_size=(64, 48), crops_coords_top_left=(4, 2), target_size=(32, 40),
                 negative_original_size=(16, 16), negative_crops_coords_top_left=(1, 3), negative_target_size=(24, 32),
                 guidance_rescale=0.7),
    # a negative prompt and a second prompt for text_encoder_2, one original_size per prompt
    "dpm_solver_pp_2m": dict(negative=True, prompt_2=True, original_size=[(64, 64), (128, 96)]),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from sdjax.testing import build_tiny_sdxl_pipeline, build_tiny_sdxl_refiner

    return (build_tiny_sdxl_pipeline(tmp_path_factory.mktemp("tiny-sdxl")),
            build_tiny_sdxl_refiner(tmp_path_factory.mktemp("tiny-sdxl-refiner")))


@pytest.fixture(scope="module")
def base(folders):
    return FlaxStableDiffusionXLPipeline.from_pretrained(folders[0])


@pytest.fixture(scope="module")
def refiner(folders):
    return FlaxStableDiffusionXLImg2ImgPipeline.from_pretrained(folders[1])


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


def gaussian(seed, batch=len(PROMPTS)):
    return np.asarray(jax.random.normal(jax.random.PRNGKey(seed), (batch, 4, SIZE // 2, SIZE // 2)), np.float32)


def torch_reference(cls_name, folder, scheduler, monkeypatch, noise=None, prompts=PROMPTS, **call):
    """Run a diffusers SDXL pipeline with our noise and the posterior mean; returns (output, per-step latents)."""
    import diffusers
    import torch
    from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl_img2img as i2i

    monkeypatch.setattr(i2i, "retrieve_latents", lambda out, generator=None, sample_mode="sample":
                        out.latent_dist.mode())
    if noise is not None:
        monkeypatch.setattr(i2i, "randn_tensor", lambda shape, **kw: torch.from_numpy(np.asarray(noise)).reshape(shape))
    pipe = getattr(diffusers, cls_name).from_pretrained(folder, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    extra = {"algorithm_type": "dpmsolver++", "solver_order": 2} if scheduler == "dpm_solver_pp_2m" else {}
    pipe.scheduler = getattr(diffusers, SCHEDULERS[scheduler]).from_config(pipe.scheduler.config, **extra)
    steps = []

    def keep(p, i, t, kw):
        steps.append(kw["latents"].detach().numpy().copy())
        return kw

    call = {k: (torch.from_numpy(v) if isinstance(v, np.ndarray) else v) for k, v in call.items()}
    with torch.no_grad():
        out = pipe(prompts, num_inference_steps=STEPS, guidance_scale=GUIDANCE, callback_on_step_end=keep,
                   **({"output_type": "np"} | call))
    images = out.images.detach().numpy() if hasattr(out.images, "detach") else np.asarray(out.images)
    return images, np.stack(steps)


def report(name, images, ref_images, traj, ref_steps, image_tol=2e-3):
    n = ref_steps.shape[0]
    assert traj.latents.shape[0] == n + 1, (traj.latents.shape, n)
    assert traj.pred_original_samples.shape[0] == n
    image_err = float(np.abs(np.asarray(images) - ref_images).max())
    image_rel = rel_err(images, ref_images)
    step_err = max(rel_err(traj.latents[i + 1], ref_steps[i]) for i in range(n))
    print(f"\n[{name}] {n} steps run; final output max abs err {image_err:.2e} (rel {image_rel:.2e}); "
          f"per-step latents max rel err {step_err:.2e}")
    assert image_err <= image_tol
    assert step_err <= 1e-3
    return image_err, step_err


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_text2img_parity(base, folders, scheduler, monkeypatch):
    pipe, params = base
    pipe = pipe.with_scheduler(scheduler)
    case = dict(TEXT2IMG_CASES[scheduler])
    negative, prompt_2 = case.pop("negative", False), case.pop("prompt_2", False)
    prompts_2 = ["a green square", "a cat on the moon"] if prompt_2 else None
    latents = gaussian(0)
    torch_call = dict(case, height=SIZE, width=SIZE, latents=latents)
    if negative:
        torch_call["negative_prompt"] = NEGATIVE
    if prompt_2:
        torch_call["prompt_2"] = prompts_2
    per_prompt = isinstance(case.get("original_size"), list)  # diffusers takes one tuple
    # diffusers' StableDiffusionXLPipeline lays its time ids out as cat([negative, positive]).repeat(batch): at
    # batch > 1 with negative micro-conditioning, rows 1..B-1 of each half get the other half's ids (its img2img
    # pipeline repeats before concatenating, as sdjax does for both). Compared one prompt at a time there.
    per_prompt |= "negative_original_size" in case
    if per_prompt:
        refs = [torch_reference("StableDiffusionXLPipeline", folders[0], scheduler, monkeypatch, prompts=[PROMPTS[b]],
                                **(torch_call | {"latents": latents[b:b + 1]}
                                   | ({"original_size": case["original_size"][b]}
                                      if isinstance(case.get("original_size"), list) else {})
                                   | ({"negative_prompt": [NEGATIVE[b]]} if negative else {})
                                   | ({"prompt_2": [prompts_2[b]]} if prompt_2 else {})))
                for b in range(len(PROMPTS))]
        ref_images = np.concatenate([r[0] for r in refs])
        ref_steps = np.concatenate([r[1] for r in refs], axis=1)
    else:
        ref_images, ref_steps = torch_reference("StableDiffusionXLPipeline", folders[0], scheduler, monkeypatch,
                                                **torch_call)
    ids = pipe.prepare_inputs(PROMPTS, prompts_2)
    assert ids.shape == (2, 2, 77) and ids.dtype == np.int32
    neg_ids = pipe.prepare_inputs(NEGATIVE) if negative else None
    out = pipe(ids, params, jax.random.PRNGKey(0), num_inference_steps=STEPS, guidance_scale=GUIDANCE,
               neg_prompt_ids=neg_ids, **case | {"latents": latents})
    assert out.images.shape == (2, SIZE, SIZE, 3)
    report(f"sdxl text2img {scheduler}", out.images, ref_images, out.trajectory, ref_steps)


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_refiner_img2img_parity(refiner, folders, scheduler, monkeypatch):
    """The refiner (text_encoder_2 only, aesthetic score) as image-to-image at two strengths."""
    import torch

    pipe, params = refiner
    assert pipe.text_encoder is None and pipe.requires_aesthetics_score and "text_encoder" not in params
    pipe = pipe.with_scheduler(scheduler)
    ids, image = pipe.prepare_inputs(PROMPTS, smooth_images())
    assert ids.shape == (2, 1, 77)
    noise = gaussian(3)
    micro = dict(aesthetic_score=7.0, negative_aesthetic_score=2.0, original_size=(64, 64),
                 negative_crops_coords_top_left=(2, 2))
    for strength in (0.3, 0.75):
        ref_images, ref_steps = torch_reference("StableDiffusionXLImg2ImgPipeline", folders[1], scheduler,
                                                monkeypatch, noise, image=torch.from_numpy(image), strength=strength,
                                                negative_prompt=NEGATIVE, **micro)
        out = pipe(ids, image, params, jax.random.PRNGKey(0), strength=strength, num_inference_steps=STEPS,
                   guidance_scale=GUIDANCE, noise=noise, sample_posterior=False,
                   neg_prompt_ids=pipe.prepare_inputs(NEGATIVE), **micro)
        report(f"sdxl refiner img2img {scheduler} strength {strength}", out.images, ref_images, out.trajectory,
               ref_steps)


def test_base_plus_refiner_ensemble_of_experts(base, refiner, folders, monkeypatch):
    """denoising_end=0.8 on the base (latents out), denoising_start=0.8 on the refiner from those latents."""
    import torch

    (bpipe, bparams), (rpipe, rparams) = base, refiner
    latents = gaussian(5)
    ref_latents, ref_base_steps = torch_reference("StableDiffusionXLPipeline", folders[0], "euler", monkeypatch,
                                                  height=SIZE, width=SIZE, latents=latents, denoising_end=0.8,
                                                  output_type="latent")
    out = bpipe(bpipe.prepare_inputs(PROMPTS), bparams, jax.random.PRNGKey(0), num_inference_steps=STEPS,
                guidance_scale=GUIDANCE, latents=latents, denoising_end=0.8, output_type="latent")
    assert ref_base_steps.shape[0] == 8  # timesteps >= 200 of 10 leading-spaced ones
    assert out.images.shape == (2, 4, SIZE // 2, SIZE // 2)
    report("sdxl base denoising_end=0.8 (latents)", out.images, ref_latents, out.trajectory, ref_base_steps,
           image_tol=2e-3 * float(np.abs(ref_latents).max()))
    np.testing.assert_array_equal(np.asarray(out.trajectory.latents[-1]), np.asarray(out.images))

    handoff = np.asarray(out.images)
    ref_images, ref_steps = torch_reference("StableDiffusionXLImg2ImgPipeline", folders[1], "euler", monkeypatch,
                                            image=torch.from_numpy(handoff), denoising_start=0.8)
    refined = rpipe(rpipe.prepare_inputs(PROMPTS), handoff, rparams, jax.random.PRNGKey(0),
                    num_inference_steps=STEPS, guidance_scale=GUIDANCE, denoising_start=0.8)
    assert ref_steps.shape[0] == 2
    report("sdxl refiner denoising_start=0.8", refined.images, ref_images, refined.trajectory, ref_steps)
    # the refiner starts where the base stopped: its trajectory begins at the hand-off latents, untouched
    np.testing.assert_array_equal(np.asarray(refined.trajectory.latents[0]), handoff)
    np.testing.assert_array_equal(np.concatenate([out.trajectory.timesteps, refined.trajectory.timesteps]),
                                  np.asarray(bpipe.scheduler.set_timesteps(STEPS, (1, 4, 16, 16)).timesteps))


def test_no_recompile_for_traced_conditioning(base):
    """guidance, guidance_rescale, micro-conditioning and denoising_end are traced: one program for all."""
    pipe, params = base
    pipe = pipe.with_scheduler("ddim")
    ids = pipe.prepare_inputs(PROMPTS)
    kw = dict(num_inference_steps=4, return_trajectory=False, denoising_end=0.5)
    first = pipe(ids, params, jax.random.PRNGKey(0), **kw)
    size = run_jit._cache_size()
    variants = [dict(guidance_scale=2.0, guidance_rescale=0.5), dict(original_size=(128, 64), target_size=(16, 16)),
                dict(crops_coords_top_left=[(0, 0), (8, 4)], denoising_end=0.9),
                dict(negative_original_size=(8, 8), negative_target_size=(8, 8), denoising_end=0.3)]
    outs = [pipe(ids, params, jax.random.PRNGKey(0), **(kw | v)) for v in variants]
    assert run_jit._cache_size() == size, "micro-conditioning / guidance_rescale / denoising_end recompiled"
    for o in outs:  # and each of them changes the result
        assert float(np.abs(np.asarray(o.images) - np.asarray(first.images)).max()) > 1e-4


@pytest.mark.slow
def test_pmap_and_mesh_match_single_device(base):
    """jit=True (pmap) and a mesh give the single-device result, micro-conditioning and denoising_end included."""
    from flax.jax_utils import replicate
    from flax.training.common_utils import shard
    from jax.sharding import Mesh

    pipe, params = base
    n_dev = jax.local_device_count()
    assert n_dev >= 4, "conftest sets 8 host CPU devices"
    ids = pipe.prepare_inputs((PROMPTS * n_dev)[:n_dev])
    latents = gaussian(3, n_dev)
    sizes = [(32 * (1 + i), 32) for i in range(n_dev)]
    kw = dict(num_inference_steps=4, guidance_scale=GUIDANCE, guidance_rescale=0.5, denoising_end=0.6)
    single = pipe(ids, params, jax.random.PRNGKey(0), latents=latents, original_size=sizes, **kw)

    rngs = jax.random.split(jax.random.PRNGKey(0), n_dev)
    pmapped = pipe(shard(ids), replicate(params), rngs, latents=shard(latents),
                   original_size=np.asarray(sizes).reshape(n_dev, 1, 2), jit=True, **kw)
    assert pmapped.images.shape == (n_dev, 1, SIZE, SIZE, 3)
    np.testing.assert_allclose(np.asarray(pmapped.images).reshape(single.images.shape), single.images, atol=1e-5)
    assert pmapped.trajectory.latents.shape[:3] == (n_dev, single.trajectory.latents.shape[0], 1)

    mesh = Mesh(np.array(jax.devices()), ("data",))
    meshed = pipe(ids, params, jax.random.PRNGKey(0), latents=latents, original_size=sizes, mesh=mesh, **kw)
    np.testing.assert_allclose(np.asarray(meshed.images), single.images, atol=1e-5)
    assert len(meshed.images.sharding.device_set) == n_dev


def test_bf16_keeps_the_vae_in_float32(folders):
    """force_upcast: the VAE is loaded and run in float32 when the pipeline runs in bfloat16 (diffusers issue 7765)."""
    pipe, params = FlaxStableDiffusionXLPipeline.from_pretrained(folders[0], dtype=jnp.bfloat16)
    assert pipe.vae_upcast and pipe.vae.dtype == jnp.float32
    assert {p.dtype for p in jax.tree_util.tree_leaves(params["vae"])} == {jnp.dtype(jnp.float32)}
    assert {p.dtype for p in jax.tree_util.tree_leaves(params["unet"])} == {jnp.dtype(jnp.bfloat16)}
    out = pipe(pipe.prepare_inputs(PROMPTS[:1]), params, jax.random.PRNGKey(0), num_inference_steps=3,
               return_trajectory=False)
    assert out.images.dtype == jnp.float32 and np.isfinite(np.asarray(out.images)).all()
    # params a user casts to bf16 anyway are upcast in the program
    cast = dict(params, vae=jax.tree_util.tree_map(lambda p: p.astype(jnp.bfloat16), params["vae"]))
    z = jnp.asarray(gaussian(1)[:1])
    np.testing.assert_allclose(np.asarray(pipe.decode_latents(cast["vae"], z)),
                               np.asarray(pipe.decode_latents(params["vae"], z)), atol=2e-2)


def test_loading_picks_the_class_and_refuses_the_wrong_one(folders, tiny_folder, tmp_path):
    base_folder, refiner_folder = folders
    pipe, params = load_pipeline(refiner_folder)
    assert type(pipe) is FlaxStableDiffusionXLImg2ImgPipeline and set(params) == {"text_encoder_2", "vae", "unet"}
    from sdjax.pipelines.auto import pipeline_class

    assert pipeline_class(base_folder) is FlaxStableDiffusionXLPipeline
    assert pipeline_class(base_folder, task="img2img") is FlaxStableDiffusionXLImg2ImgPipeline
    assert pipeline_class(tiny_folder) is FlaxStableDiffusionPipeline
    with pytest.raises(ConfigError, match="FlaxStableDiffusionXLPipeline"):
        FlaxStableDiffusionPipeline.from_pretrained(base_folder)
    with pytest.raises(ConfigError, match="FlaxStableDiffusionPipeline"):
        FlaxStableDiffusionXLPipeline.from_pretrained(tiny_folder)
    with pytest.raises(ConfigError, match="inpaint is not implemented"):
        pipeline_class(base_folder, task="inpaint")

    # an SDXL folder without text_encoder_2 / tokenizer_2
    for missing in ("text_encoder_2", "tokenizer_2"):
        broken = tmp_path / f"no-{missing}"
        shutil.copytree(base_folder, broken)
        index = json.loads((broken / "model_index.json").read_text())
        del index[missing]
        (broken / "model_index.json").write_text(json.dumps(index))
        with pytest.raises(ConfigError, match=f"model_index.json has no {missing}"):
            FlaxStableDiffusionXLPipeline.from_pretrained(broken)
        shutil.rmtree(broken / missing)
        index[missing] = ["transformers", "CLIPTextModelWithProjection" if missing == "text_encoder_2"
                          else "CLIPTokenizer"]
        (broken / "model_index.json").write_text(json.dumps(index))
        with pytest.raises(ConfigError, match=f"the folder has no {missing}/"):
            FlaxStableDiffusionXLPipeline.from_pretrained(broken)


def test_bad_inputs(base, refiner):
    pipe, params = base
    rpipe, rparams = refiner
    ids = pipe.prepare_inputs(PROMPTS)
    key = jax.random.PRNGKey(0)
    call = lambda **kw: pipe(ids, params, key, num_inference_steps=2, **kw)  # noqa: E731
    with pytest.raises(InputError, match="`height` must be a positive multiple of 4"):
        call(height=30)
    for bad, match in (((1024,), "original_size` must be a pair"), ((1024, 1024, 3), "original_size` must be a pair"),
                       (("a", "b"), "original_size` must be a pair"), ((0, 64), "finite numbers > 0"),
                       ([(64, 64)] * 3, "one pair per prompt"), ((np.nan, 64), "finite")):
        with pytest.raises(InputError, match=match):
            call(original_size=bad)
    with pytest.raises(InputError, match="crops_coords_top_left.*>= 0"):
        call(crops_coords_top_left=(-1, 0))
    with pytest.raises(InputError, match="aesthetic score"):
        call(aesthetic_score=6.0)  # the base is conditioned on the target size
    with pytest.raises(InputError, match="both"):
        call(negative_original_size=(64, 64))
    with pytest.raises(InputError, match="denoising_end"):
        call(denoising_end=1.5)
    with pytest.raises(InputError, match="output_type"):
        call(output_type="pil")
    with pytest.raises(InputError, match=r"\[batch, 2, 77\]"):
        pipe(ids[:, 0], params, key, num_inference_steps=2)
    with pytest.raises(InputError, match="prompt_2"):
        rpipe.prepare_inputs(PROMPTS, prompt_2=PROMPTS)
    rids, image = rpipe.prepare_inputs(PROMPTS, smooth_images())
    with pytest.raises(InputError, match="target_size"):
        rpipe(rids, image, rparams, key, num_inference_steps=10, target_size=(32, 32))
    with pytest.raises(InputError, match="aesthetic_score"):
        rpipe(rids, image, rparams, key, num_inference_steps=10, aesthetic_score="high")
    with pytest.raises(InputError, match="denoising_start"):
        rpipe(rids, image, rparams, key, num_inference_steps=10, denoising_start=0.0)
    with pytest.raises(InputError, match=r"\[batch, 1, 77\]"):
        rpipe(ids, image, rparams, key, num_inference_steps=10)


# ---------------------------------------------------------------------------- CLI
def run_cli(capsys, *argv) -> tuple[int, str]:
    from sdjax.cli import main

    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_cli_on_sdxl_folders(folders, tmp_path, capsys):
    """`sdjax generate` / `img2img` pick the SDXL classes from model_index.json; the default size is the model's."""
    from PIL import Image

    base_folder, refiner_folder = folders
    code, err = run_cli(capsys, "generate", "--model", base_folder, "--prompt", "a cat", "--steps", "2",
                        "--out", tmp_path / "gen")
    assert code == 0, err[-3000:]
    settings = json.loads((tmp_path / "gen" / "settings.json").read_text())
    assert settings["guidance_scale"] == 5.0 and settings["scheduler"] == "euler"  # SDXL's defaults
    assert Image.open(tmp_path / "gen" / "image-000.png").size == (SIZE, SIZE)  # unet sample_size x VAE factor

    code, err = run_cli(capsys, "img2img", "--model", refiner_folder, "--image", tmp_path / "gen" / "image-000.png",
                        "--prompt", "a cat", "--steps", "4", "--strength", "0.5", "--out", tmp_path / "refined")
    assert code == 0, err[-3000:]
    assert Image.open(tmp_path / "refined" / "image-000.png").size == (SIZE, SIZE)

    code, err = run_cli(capsys, "inpaint", "--model", base_folder, "--image", tmp_path / "gen" / "image-000.png",
                        "--mask", tmp_path / "gen" / "image-000.png", "--prompt", "a cat", "--steps", "2",
                        "--out", tmp_path / "inpaint")
    assert code == 2 and "inpaint is not implemented" in err and "Traceback" not in err
