"""FlaxStableDiffusionControlNetPipeline (and its image-to-image twin) against diffusers' PyTorch
StableDiffusionControlNetPipeline / StableDiffusionControlNetImg2ImgPipeline on the tiny random folder, with one and
two ControlNets (made by diffusers' ControlNetModel.from_unet, perturbed, saved); plus no-recompile, pmap/mesh and
bad-input checks. The same initial latents go to both sides (diffusers' `latents`; for img2img its random draws are
patched to sdjax's numbers, as in test_image_pipelines.py)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from sdjax import ConfigError, InputError
from sdjax.pipelines import (FlaxStableDiffusionControlNetImg2ImgPipeline, FlaxStableDiffusionControlNetPipeline,
                             FlaxStableDiffusionPipeline)
from sdjax.pipelines.controlnet import controlnet_keep, to_control_images
from sdjax.pipelines.engine import run_jit
from sdjax.testing import perturb_, rel_err

from .test_image_pipelines import smooth_images

PROMPTS = ["a photo of an astronaut riding a horse", "a red circle on the moon"]
STEPS = 10
GUIDANCE = 7.5
SIZE = 32
SCHEDULERS = {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler", "pndm": "PNDMScheduler"}


def control_images(n=2, seed=0):
    """Silhouette-like control images (a disc and a bar with soft edges), float [n, 3, H, W] in [0, 1]."""
    y, x = (np.mgrid[0:SIZE, 0:SIZE] + 0.5) / SIZE
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        cx, cy, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.15, 0.3)
        disc = np.clip((r - np.hypot(x - cx, y - cy)) * SIZE + 0.5, 0, 1)
        bar = (np.abs(y - rng.uniform(0.2, 0.8)) < 0.06) * rng.uniform(0.3, 1.0)
        out.append(np.stack([disc, np.maximum(disc, bar), bar]))
    return np.stack(out).astype(np.float32)


@pytest.fixture(scope="module")
def controlnet_folders(tiny_folder, tmp_path_factory):
    """Two ControlNets for the tiny UNet (diffusers' from_unet, weights perturbed so the zero convolutions act)."""
    import diffusers
    import torch

    unet = diffusers.UNet2DConditionModel.from_pretrained(tiny_folder, subfolder="unet")
    folders = []
    for seed, channels in ((11, (8, 16)), (12, (4, 8))):
        torch.manual_seed(seed)
        cn = perturb_(diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=channels), seed)
        folder = tmp_path_factory.mktemp(f"controlnet-{seed}")
        cn.save_pretrained(folder, safe_serialization=True)
        folders.append(folder)
    return folders


@pytest.fixture(scope="module")
def pipes(tiny_pipeline, controlnet_folders):
    """(one-ControlNet pipeline, two-ControlNet pipeline, params with both ControlNets' params)."""
    from sdjax.pipelines.controlnet import load_controlnets

    base, params = tiny_pipeline
    modules, cn_params = load_controlnets(controlnet_folders)
    one = FlaxStableDiffusionControlNetPipeline.from_pipe(base, controlnet=modules[0])
    two = FlaxStableDiffusionControlNetPipeline.from_pipe(base, controlnet=modules)
    return one, two, {**params, "controlnet": cn_params}


def initial_latents(batch=len(PROMPTS), seed=0):
    return np.asarray(jax.random.normal(jax.random.PRNGKey(seed), (batch, 4, SIZE // 2, SIZE // 2)), np.float32)


def torch_reference(cls_name, tiny_folder, folders, scheduler, control, monkeypatch=None, noise=None, **call):
    """A diffusers ControlNet pipeline run: (images, per-step latents)."""
    import diffusers
    import torch

    nets = [diffusers.ControlNetModel.from_pretrained(f) for f in folders]
    controlnet = nets[0] if len(nets) == 1 else diffusers.MultiControlNetModel(nets)
    pipe = getattr(diffusers, cls_name).from_pretrained(tiny_folder, controlnet=controlnet, safety_checker=None,
                                                        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = getattr(diffusers, SCHEDULERS[scheduler]).from_config(pipe.scheduler.config)
    if noise is not None:  # image-to-image: the posterior mean and our noise
        from diffusers.pipelines.controlnet import pipeline_controlnet_img2img as module

        monkeypatch.setattr(module, "retrieve_latents", lambda out, generator=None, sample_mode="sample":
                            out.latent_dist.mode())
        monkeypatch.setattr(module, "randn_tensor",
                            lambda shape, **kw: torch.from_numpy(np.asarray(noise)).reshape(shape))
    steps = []

    def keep(p, i, t, kw):
        steps.append(kw["latents"].detach().numpy().copy())
        return kw

    images = [torch.from_numpy(c) for c in control]
    with torch.no_grad():
        out = pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="np",
                   callback_on_step_end=keep, **{("control_image" if noise is not None else "image"):
                                                 images[0] if len(images) == 1 else images}, **call)
    return out.images, np.stack(steps)


def report(name, images, ref_images, traj, ref_steps, effect=None):
    n = ref_steps.shape[0]
    assert traj.latents.shape[0] == n + 1, (traj.latents.shape, n)
    image_err = float(np.abs(np.asarray(images) - ref_images).max())
    step_err = max(rel_err(traj.latents[i + 1], ref_steps[i]) for i in range(n))
    extra = f"; the control changes the image by {effect:.2f} max abs" if effect is not None else ""
    print(f"\n[{name}] {n} steps; final image max abs err {image_err:.2e}; per-step latents max rel err "
          f"{step_err:.2e}{extra}")
    assert image_err <= 2e-3
    assert step_err <= 1e-3
    return image_err, step_err


# (name, scheduler, ControlNets, call arguments): scales != 1, start/end and guess mode, one and two ControlNets
CASES = [
    ("one ddim scale 0.7", "ddim", 1, dict(controlnet_conditioning_scale=0.7)),
    ("one euler start 0.2 end 0.8 guess", "euler", 1, dict(controlnet_conditioning_scale=1.3, control_guidance_start=0.2,
                                                         control_guidance_end=0.8, guess_mode=True)),
    ("one pndm start 0.35", "pndm", 1, dict(controlnet_conditioning_scale=0.9, control_guidance_start=0.35)),
    ("two ddim start/end", "ddim", 2, dict(controlnet_conditioning_scale=[0.6, 1.2], control_guidance_start=[0.0, 0.3],
                                          control_guidance_end=[0.7, 1.0])),
    ("two euler guess", "euler", 2, dict(controlnet_conditioning_scale=[1.1, 0.5], guess_mode=True)),
]


@pytest.mark.parity
@pytest.mark.parametrize("name,scheduler,k,call", CASES, ids=[c[0] for c in CASES])
def test_parity_with_diffusers_controlnet_pipeline(pipes, tiny_folder, controlnet_folders, name, scheduler, k, call):
    one, two, params = pipes
    pipe = (one if k == 1 else two).with_scheduler(scheduler)
    control = [control_images(seed=s) for s in range(k)]
    latents = initial_latents()
    import torch

    ref_images, ref_steps = torch_reference("StableDiffusionControlNetPipeline", tiny_folder, controlnet_folders[:k],
                                            scheduler, control, latents=torch.from_numpy(latents), **call)
    p = params if k == 2 else {**params, "controlnet": params["controlnet"][0]}  # one: a single tree, as diffusers Flax
    out = pipe(pipe.prepare_text_inputs(PROMPTS), control[0] if k == 1 else control, p, jax.random.PRNGKey(0),
               num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=latents, **call)
    plain = pipe(pipe.prepare_text_inputs(PROMPTS), control[0] if k == 1 else control, p, jax.random.PRNGKey(0),
                 num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=latents,
                 **{**call, "controlnet_conditioning_scale": 0.0})
    effect = float(np.abs(np.asarray(out.images) - np.asarray(plain.images)).max())
    report(f"controlnet {name}", out.images, ref_images, out.trajectory, ref_steps, effect)
    assert effect > 0.05, "the ControlNets must change the image (else the test proves nothing)"


IMG2IMG_CASES = [("ddim", 0.6, dict(controlnet_conditioning_scale=0.8, control_guidance_end=0.6)),
                 ("euler", 0.75, dict(controlnet_conditioning_scale=[0.7, 1.0], control_guidance_start=[0.0, 0.2]))]


@pytest.mark.parity
@pytest.mark.parametrize("scheduler,strength,call", IMG2IMG_CASES, ids=[c[0] for c in IMG2IMG_CASES])
def test_img2img_parity_with_diffusers(pipes, tiny_folder, controlnet_folders, scheduler, strength, call, monkeypatch):
    one, two, params = pipes
    k = 2 if isinstance(call["controlnet_conditioning_scale"], list) else 1
    pipe = FlaxStableDiffusionControlNetImg2ImgPipeline.from_pipe(one if k == 1 else two, scheduler=scheduler)
    ids, image = pipe.prepare_inputs(PROMPTS, smooth_images())
    control = [control_images(seed=s + 3) for s in range(k)]
    noise = initial_latents(seed=4)
    import torch

    ref_images, ref_steps = torch_reference("StableDiffusionControlNetImg2ImgPipeline", tiny_folder,
                                            controlnet_folders[:k], scheduler, control, monkeypatch, noise,
                                            image=torch.from_numpy(image), strength=strength, **call)
    out = pipe(ids, image, control[0] if k == 1 else control, {**params, "controlnet": params["controlnet"][:k]},
               jax.random.PRNGKey(0), strength=strength, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
               noise=noise, sample_posterior=False, **call)
    report(f"controlnet img2img {scheduler} strength {strength} x{k}", out.images, ref_images, out.trajectory,
           ref_steps)


def test_controlnet_keep_is_diffusers_table():
    keep = controlnet_keep(10, [0.0, 0.2, 0.35], [1.0, 0.8, 1.0])
    assert keep.shape == (10, 3)
    assert keep[:, 0].tolist() == [1.0] * 10
    assert keep[:, 1].tolist() == [0, 0, 1, 1, 1, 1, 1, 1, 0, 0]  # 2/10 < 0.2 is False; 9/10 > 0.8
    assert keep[:, 2].tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
    # image-to-image: the table counts the calls that run (from call 4 of 10: 6 calls)
    late = controlnet_keep(10, [0.5], [1.0], first_call=4)
    assert late[:, 0].tolist() == [0, 0, 0, 0, 0, 0, 0, 1, 1, 1]


def test_scale_start_end_and_image_do_not_recompile(pipes):
    one, two, params = pipes
    pipe = two.with_scheduler("ddim")
    ids = pipe.prepare_text_inputs(PROMPTS)
    kw = dict(num_inference_steps=4, guidance_scale=GUIDANCE, return_trajectory=False)
    before = run_jit._cache_size()
    images = []
    for s, (scale, start, end) in enumerate([([1.0, 1.0], 0.0, 1.0), ([0.3, 1.7], [0.25, 0.0], [1.0, 0.5]),
                                             (0.0, 0.5, 0.75)]):
        out = pipe(ids, [control_images(seed=s), control_images(seed=s + 5)], params, jax.random.PRNGKey(0),
                   controlnet_conditioning_scale=scale, control_guidance_start=start, control_guidance_end=end, **kw)
        images.append(np.asarray(out.images))
    assert run_jit._cache_size() == before + 1, "one program for every scale, start, end and control image"
    assert not np.allclose(images[0], images[1]) and not np.allclose(images[1], images[2])
    # scale 0 is the plain text-to-image pipeline (the ControlNets add exactly zero)
    base = FlaxStableDiffusionPipeline.from_pipe(pipe)
    plain = base(ids, params, jax.random.PRNGKey(0), **kw)
    np.testing.assert_allclose(images[2], np.asarray(plain.images), atol=1e-5)


@pytest.mark.slow
def test_pmap_and_mesh_match_single_device(pipes):
    from flax.jax_utils import replicate
    from flax.training.common_utils import shard
    from jax.sharding import Mesh

    _, two, params = pipes
    pipe = two.with_scheduler("euler")
    n = jax.local_device_count()
    ids = pipe.prepare_text_inputs((PROMPTS * n)[:n])
    control = [np.concatenate([control_images(2, seed=s + j) for j in range(n // 2)]) for s in (0, 7)]
    latents = initial_latents(n, seed=2)
    kw = dict(num_inference_steps=4, guidance_scale=GUIDANCE, latents=latents, controlnet_conditioning_scale=[0.8, 1.1],
              control_guidance_start=[0.0, 0.25])
    single = pipe(ids, control, params, jax.random.PRNGKey(0), **kw)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    meshed = pipe(ids, control, params, jax.random.PRNGKey(0), mesh=mesh, **kw)
    np.testing.assert_allclose(np.asarray(meshed.images), single.images, atol=3e-5)
    assert rel_err(meshed.trajectory.pred_original_samples, single.trajectory.pred_original_samples) <= 1e-5
    kw["latents"] = shard(latents)
    pmapped = pipe(shard(ids), [shard(c) for c in control], replicate(params), jax.random.split(jax.random.PRNGKey(0), n),
                   jit=True, **kw)
    np.testing.assert_allclose(np.asarray(pmapped.images).reshape(single.images.shape), single.images, atol=3e-5)
    assert pmapped.trajectory.latents.shape[:2] == (n, single.trajectory.latents.shape[0])


def test_prepare_image_inputs_resizes_pil_as_diffusers(pipes, tiny_folder):
    from PIL import Image

    one, _, _ = pipes
    big = Image.fromarray((control_images(1)[0].transpose(1, 2, 0) * 255).astype(np.uint8)).resize((50, 44))
    ours = one.prepare_image_inputs(big, height=SIZE, width=SIZE)
    assert ours.shape == (1, 3, SIZE, SIZE) and 0 <= ours.min() and ours.max() <= 1
    own = one.prepare_image_inputs(big)  # its own size, rounded down to a multiple of 4 (the tiny model's)
    assert own.shape == (1, 3, 44, 48)
    try:
        from diffusers.image_processor import VaeImageProcessor
    except ImportError:
        return
    ref = VaeImageProcessor(vae_scale_factor=2, do_convert_rgb=True, do_normalize=False).preprocess(
        big, height=SIZE, width=SIZE).numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-6)


def test_bad_inputs(pipes, tiny_pipeline):
    one, two, params = pipes
    ids = one.prepare_text_inputs(PROMPTS)
    key = jax.random.PRNGKey(0)
    control = control_images()
    kw = dict(num_inference_steps=2)
    with pytest.raises(InputError, match="1 control image for 2 ControlNets"):
        two(ids, control, params, key, **kw)
    with pytest.raises(InputError, match="3 control images for 2 ControlNets"):
        two(ids, [control] * 3, params, key, **kw)
    with pytest.raises(InputError, match=r"`image\[1\]` is 16x16 \(WxH\), `image\[0\]` 32x32"):
        two(ids, [control, control[..., ::2, ::2]], params, key, **kw)
    with pytest.raises(InputError, match="`height` = 64, but the control image is 32"):
        one(ids, control, params, key, height=64, **kw)
    with pytest.raises(InputError, match="values in \\[0, 1\\]"):
        one(ids, control * 2 - 1, params, key, **kw)
    with pytest.raises(InputError, match="`controlnet_conditioning_scale` has 3 values for 2 ControlNets"):
        two(ids, [control] * 2, params, key, controlnet_conditioning_scale=[1, 1, 1], **kw)
    with pytest.raises(InputError, match="need 0 <= start < end <= 1"):
        one(ids, control, params, key, control_guidance_start=0.6, control_guidance_end=0.4, **kw)
    with pytest.raises(InputError, match="need 0 <= start < end <= 1"):
        one(ids, control, params, key, control_guidance_end=1.5, **kw)
    with pytest.raises(InputError, match="must be finite"):
        one(ids, control, params, key, controlnet_conditioning_scale=float("nan"), **kw)
    with pytest.raises(InputError, match=r"params\['controlnet'\]` has 1 params trees for 2"):
        two(ids, [control] * 2, {**params, "controlnet": params["controlnet"][:1]}, key, **kw)
    with pytest.raises(InputError, match=r"params\['controlnet'\]\[0\]\['controlnet_cond_embedding'\]"):
        one(ids, control, {**params, "controlnet": params["controlnet"][1:]}, key, **kw)
    with pytest.raises(InputError, match="has 1 channels; its ControlNet takes 3"):
        one(ids, control[:, :1], params, key, **kw)
    with pytest.raises(InputError, match="16x16 \\(WxH\\), the output 32x32"):
        to_control_images(np.zeros((16, 16, 3), np.float32), SIZE, SIZE)
    # ControlNets that do not fit the UNet: named, with both models' values
    base = tiny_pipeline[0]
    cn = one.controlnet[0]
    with pytest.raises(ConfigError, match=r"cross_attention_dim 16 \(ControlNet\) vs 32 \(UNet\)"):
        FlaxStableDiffusionControlNetPipeline.from_pipe(base, controlnet=cn.clone(cross_attention_dim=16))
    with pytest.raises(ConfigError, match=r"controlnet\[1\]: .*down-path layout: .*layers_per_block 2.* the UNet"):
        FlaxStableDiffusionControlNetPipeline.from_pipe(base, controlnet=[cn, cn.clone(layers_per_block=2)])
    with pytest.raises(ConfigError, match="4x downsampling .* the VAE's factor is 2"):
        FlaxStableDiffusionControlNetPipeline.from_pipe(base, controlnet=cn.clone(
            conditioning_embedding_out_channels=(8, 16, 16)))
    with pytest.raises(ConfigError, match="must be a ControlNetModel"):
        FlaxStableDiffusionControlNetPipeline.from_pipe(base, controlnet="path/to/cn")
    with pytest.raises(InputError, match="has no ControlNet"):
        FlaxStableDiffusionControlNetPipeline.from_pipe(base)(ids, control, params, key, **kw)
    img2img = FlaxStableDiffusionControlNetImg2ImgPipeline.from_pipe(one)
    _, image = img2img.prepare_inputs(PROMPTS, smooth_images())
    with pytest.raises(InputError, match="`image` is 16x16 \\(WxH\\), `control_image` 32x32"):
        img2img(ids, image[..., ::2, ::2], control, params, key, **kw)
    with pytest.raises(InputError, match="2 control images for 1 ControlNet"):
        img2img(ids, image, [control] * 2, params, key, **kw)


def _write_control_pngs(folder, n=2):
    from PIL import Image

    paths = []
    for s in range(n):
        path = folder / f"control-{s}.png"
        Image.fromarray((control_images(1, seed=s)[0].transpose(1, 2, 0) * 255).round().astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def test_cli_generate_with_two_controlnets(capsys, tmp_path, tiny_folder, controlnet_folders, pipes):
    """`sdjax generate --controlnet A --controlnet B --control-image ...` gives the API's image for the same seed."""
    import json

    from sdjax.cli import main
    from sdjax.seeds import initial_noise, loop_key, sample_seeds

    pngs = _write_control_pngs(tmp_path)
    out = tmp_path / "out"
    argv = ["generate", "--model", tiny_folder, "--prompt", PROMPTS[1], "--steps", "3", "--scheduler", "ddim",
            "--controlnet", controlnet_folders[0], "--controlnet", controlnet_folders[1], "--control-image", pngs[0],
            "--control-image", pngs[1], "--control-scale", "0.5", "--control-scale", "1.5", "--control-end", "0.7",
            "--out", out]
    assert main([str(a) for a in argv]) == 0, capsys.readouterr().err
    settings = json.loads((out / "settings.json").read_text())
    assert settings["controlnet_conditioning_scale"] == [0.5, 1.5] and settings["control_guidance_end"] == 0.7
    from PIL import Image

    got = np.asarray(Image.open(out / "image-000.png"), np.float32) / 255
    _, two, params = pipes
    pipe = two.with_scheduler("ddim")
    control = [pipe.prepare_image_inputs(Image.open(p).convert("RGB")) for p in pngs]
    latents = initial_noise(sample_seeds(0, range(1)), pipe.latent_shape(1, SIZE, SIZE)[1:])
    ref = pipe(pipe.prepare_text_inputs([PROMPTS[1]]), control, params, loop_key(0), num_inference_steps=3,
               guidance_scale=settings["guidance_scale"], latents=latents, neg_prompt_ids=pipe.prepare_text_inputs([""]),
               controlnet_conditioning_scale=[0.5, 1.5], control_guidance_end=0.7, return_trajectory=False)
    assert np.abs(got - np.asarray(ref.images[0])).max() <= 1 / 255 + 1e-6


@pytest.mark.parametrize("extra,expect", [
    (("--control-image", "{png0}"), "--control-image needs --controlnet PATH"),
    (("--guess-mode",), "--guess-mode needs --controlnet PATH"),
    (("--controlnet", "{cn0}", "--controlnet", "{cn1}", "--control-image", "{png0}"),
     "1 --control-image for 2 --controlnet: give one control image per ControlNet"),
    (("--controlnet", "{cn0}", "--controlnet", "{cn1}", "--control-image", "{png0}", "--control-image", "{png1}",
      "--control-scale", "1", "--control-scale", "1", "--control-scale", "1"), "3 --control-scale for 2 --controlnet"),
    (("--controlnet", "{cn0}", "--control-image", "{png0}", "--control-scale", "nan"), "argument --control-scale"),
    (("--controlnet", "{cn0}", "--control-image", "{home}/missing.png"), "image file not found"),
    (("--controlnet", "{cn0}", "--control-image", "{odd}"), "is 30x30; this model needs sizes that are multiples of 4"),
    (("--controlnet", "{cn0}", "--control-image", "{png0}", "--control-start", "0.8", "--control-end", "0.2"),
     "need 0 <= start < end <= 1"),
    (("--controlnet", "{home}/nothing", "--control-image", "{png0}"), "nothing"),
])
def test_cli_control_errors(capsys, tmp_path, tiny_folder, controlnet_folders, extra, expect):
    from PIL import Image

    from .badinput import run_cli

    pngs = _write_control_pngs(tmp_path)
    Image.new("RGB", (30, 30)).save(tmp_path / "odd.png")
    names = dict(png0=pngs[0], png1=pngs[1], cn0=controlnet_folders[0], cn1=controlnet_folders[1], home=tmp_path,
                 odd=tmp_path / "odd.png")
    argv = ["generate", "--model", tiny_folder, "--prompt", "a cat", "--steps", "2", "--out", tmp_path / "out",
            *[str(a).format(**names) for a in extra]]
    run_cli(capsys, argv, tmp_path, expect, out=tmp_path / "out")
