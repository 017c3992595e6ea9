"""FlaxStableDiffusionPipeline against diffusers' PyTorch StableDiffusionPipeline, plus compile, sharding and CLI checks."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdjax import SdjaxError
from sdjax.pipelines import FlaxStableDiffusionPipeline

from sdjax.testing import rel_err

PROMPTS = ["a photo of an astronaut riding a horse", "a red circle on the moon"]
STEPS = 10
GUIDANCE = 7.5
SIZE = 32  # image pixels; latents 16x16 (VAE factor 2)

# diffusers class for each sdjax scheduler name, for the reference run.
TORCH_SCHEDULERS = {
    "ddim": "DDIMScheduler", "pndm": "PNDMScheduler", "euler": "EulerDiscreteScheduler",
    "lms": "LMSDiscreteScheduler", "dpm_solver_pp_2m": "DPMSolverMultistepScheduler",
}


@pytest.fixture(scope="module")
def folder(tiny_folder):
    return tiny_folder


@pytest.fixture(scope="module")
def loaded(tiny_pipeline):
    return tiny_pipeline


@pytest.fixture(scope="module")
def torch_pipe(folder):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def initial_latents(batch=len(PROMPTS), seed=0):
    return np.asarray(jax.random.normal(jax.random.PRNGKey(seed), (batch, 4, SIZE // 2, SIZE // 2)), np.float32)


def run_torch(torch_pipe, scheduler_name, latents, prompts=PROMPTS):
    import diffusers
    import torch

    cls = getattr(diffusers, TORCH_SCHEDULERS[scheduler_name])
    extra = {"algorithm_type": "dpmsolver++", "solver_order": 2} if scheduler_name == "dpm_solver_pp_2m" else {}
    torch_pipe.scheduler = cls.from_config(torch_pipe.scheduler.config, **extra)
    steps = []

    def keep(pipe, i, t, kw):
        steps.append(kw["latents"].detach().numpy().copy())
        return kw

    with torch.no_grad():
        out = torch_pipe(prompts, height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                         latents=torch.from_numpy(latents), output_type="np", callback_on_step_end=keep)
    return out.images, np.stack(steps)


@pytest.mark.parity
@pytest.mark.parametrize("scheduler", list(TORCH_SCHEDULERS))
def test_parity_with_diffusers_pipeline(loaded, torch_pipe, scheduler):
    pipe, params = loaded
    pipe = pipe.with_scheduler(scheduler)
    latents = initial_latents()
    ref_images, ref_steps = run_torch(torch_pipe, scheduler, latents)
    out = pipe(pipe.prepare_inputs(PROMPTS), params, jax.random.PRNGKey(0), num_inference_steps=STEPS,
               guidance_scale=GUIDANCE, height=SIZE, width=SIZE, latents=latents)
    images = np.asarray(out.images)
    traj = out.trajectory
    n = ref_steps.shape[0]
    assert traj.latents.shape == (n + 1, 2, 4, SIZE // 2, SIZE // 2)
    assert traj.pred_original_samples.shape == (n, 2, 4, SIZE // 2, SIZE // 2)
    assert traj.timesteps.shape == (n,)
    image_err = float(np.abs(images - ref_images).max())
    step_err = max(rel_err(traj.latents[i + 1], ref_steps[i]) for i in range(n))
    print(f"\n[{scheduler}] final image max abs err {image_err:.2e}; per-step latents max rel err {step_err:.2e}")
    assert image_err <= 2e-3
    assert step_err <= 1e-3
    # x̂0 at the last step is (nearly) the final sample for every method.
    np.testing.assert_allclose(traj.latents[0], latents * float(pipe.scheduler.init_noise_sigma(
        pipe.scheduler.set_timesteps(STEPS, latents.shape))), rtol=1e-6)


def test_jit_false_any_batch_with_guidance(loaded):
    pipe, params = loaded
    ids = pipe.prepare_inputs(["a cat", "a dog", "a red square"])
    out = pipe(ids, params, jax.random.PRNGKey(1), num_inference_steps=3, guidance_scale=5.0,
               height=SIZE, width=SIZE, return_trajectory=False)
    assert out.images.shape == (3, SIZE, SIZE, 3)
    assert out.trajectory is None
    assert 0.0 <= float(out.images.min()) and float(out.images.max()) <= 1.0


def _scan_lengths(jaxpr):
    """Lengths of every scan in a jaxpr, looking inside nested calls (jit, custom_jvp, ...)."""
    from jax.extend.core import ClosedJaxpr, Jaxpr

    lengths = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan":
            lengths.append(eqn.params["length"])
        for v in eqn.params.values():
            for sub in v if isinstance(v, (tuple, list)) else (v,):
                if isinstance(sub, ClosedJaxpr):
                    lengths += _scan_lengths(sub.jaxpr)
                elif isinstance(sub, Jaxpr):
                    lengths += _scan_lengths(sub)
    return lengths


def test_one_scan_and_no_recompile(loaded):
    from sdjax.pipelines.engine import Settings, run_jit

    pipe, params = loaded
    steps = 7
    settings = Settings(num_inference_steps=steps, height=SIZE, width=SIZE, return_trajectory=True)
    ids = jnp.asarray(pipe.prepare_inputs(PROMPTS))
    inputs = {"prompt_ids": ids, "neg_prompt_ids": jnp.asarray(pipe.unconditional_ids(2)),
              "guidance_scale": jnp.full((2,), 7.5)}
    jaxpr = jax.make_jaxpr(run_jit, static_argnums=(0, 1))(pipe, settings, inputs, params, jax.random.PRNGKey(0))
    n_calls = pipe.scheduler.set_timesteps(steps, (2, 4, SIZE // 2, SIZE // 2)).timesteps.shape[0]
    assert _scan_lengths(jaxpr.jaxpr) == [n_calls], "the denoising loop must be exactly one scan over the steps"

    kw = dict(num_inference_steps=steps, height=SIZE, width=SIZE)
    before = run_jit._cache_size()
    pipe(pipe.prepare_inputs(PROMPTS), params, jax.random.PRNGKey(0), guidance_scale=7.5, **kw)
    size = run_jit._cache_size()
    assert size == before + 1, "one program for these settings"
    pipe(pipe.prepare_inputs(PROMPTS), params, jax.random.PRNGKey(0), guidance_scale=3.0, **kw)
    pipe(pipe.prepare_inputs(PROMPTS), params, jax.random.PRNGKey(42), guidance_scale=3.0, **kw)
    pipe(pipe.prepare_inputs(["a blue square", "a dog on the moon"]), params, jax.random.PRNGKey(42), **kw)
    # a pipeline rebuilt from the same configs is the same static argument: no new program either
    type(pipe).from_pipe(pipe)(pipe.prepare_inputs(PROMPTS), params, jax.random.PRNGKey(1), **kw)
    assert run_jit._cache_size() == size


@pytest.mark.slow
def test_pmap_and_mesh_match_single_device(loaded):
    from flax.jax_utils import replicate
    from flax.training.common_utils import shard
    from jax.sharding import Mesh

    pipe, params = loaded
    n_dev = jax.local_device_count()
    assert n_dev >= 4, "conftest sets 8 host CPU devices"
    prompts = (PROMPTS * n_dev)[:n_dev]
    ids = pipe.prepare_inputs(prompts)
    latents = initial_latents(n_dev, seed=3)
    kw = dict(num_inference_steps=4, guidance_scale=GUIDANCE, height=SIZE, width=SIZE)
    single = pipe(ids, params, jax.random.PRNGKey(0), latents=latents, **kw)

    rngs = jax.random.split(jax.random.PRNGKey(0), n_dev)
    pmapped = pipe(shard(ids), replicate(params), rngs, latents=shard(latents), jit=True, **kw)
    assert pmapped.images.shape == (n_dev, 1, SIZE, SIZE, 3)
    np.testing.assert_allclose(np.asarray(pmapped.images).reshape(single.images.shape), single.images, atol=1e-5)
    assert pmapped.trajectory.latents.shape[:3] == (n_dev, single.trajectory.latents.shape[0], 1)

    mesh = Mesh(np.array(jax.devices()), ("data",))
    meshed = pipe(ids, params, jax.random.PRNGKey(0), latents=latents, mesh=mesh, **kw)
    np.testing.assert_allclose(np.asarray(meshed.images), single.images, atol=1e-5)
    # per-device batch 1 vs batch 8 compiles differently: equal to float rounding, relative to the scale
    assert rel_err(meshed.trajectory.pred_original_samples, single.trajectory.pred_original_samples) <= 1e-5
    assert len(meshed.images.sharding.device_set) == n_dev

    # jit=True with a batch that is not [n_devices, per_device, 77]
    with pytest.raises(SdjaxError, match="local devices"):
        pipe(ids[None, :1], replicate(params), rngs, jit=True, **kw)


def test_decode_trajectory_frames(loaded):
    pipe, params = loaded
    out = pipe(pipe.prepare_inputs(PROMPTS), params, jax.random.PRNGKey(0), num_inference_steps=3,
               height=SIZE, width=SIZE, decode_trajectory=True)
    t = out.trajectory.pred_original_samples.shape[0]
    assert out.frames.shape == (t, 2, SIZE, SIZE, 3) and out.frames.dtype == np.uint8
    last = np.asarray(pipe.decode_latents(params["vae"], out.trajectory.pred_original_samples[-1]))
    assert np.abs(out.frames[-1].astype(np.float32) / 255 - last).max() <= 1 / 255 + 1e-6


def test_bad_inputs(loaded):
    pipe, params = loaded
    ids = pipe.prepare_inputs(PROMPTS)
    key = jax.random.PRNGKey(0)
    with pytest.raises(SdjaxError, match="`height` must be a positive multiple of 4"):
        pipe(ids, params, key, num_inference_steps=2, height=30, width=SIZE)
    with pytest.raises(SdjaxError, match="`num_inference_steps` must be an integer >= 1"):
        pipe(ids, params, key, num_inference_steps=0, height=SIZE, width=SIZE)
    with pytest.raises(SdjaxError, match="must be \\[batch"):
        pipe(ids[0], params, key, num_inference_steps=2, height=SIZE, width=SIZE)
    with pytest.raises(ValueError, match="unknown-sampler"):
        pipe.with_scheduler("unknown-sampler")
    with pytest.warns(UserWarning, match="truncated"):
        long_ids = pipe.prepare_inputs(["a photo of a cat " * 40])
    assert long_ids.shape == (1, 77)


@pytest.mark.parity
def test_pipeline_save_roundtrip_to_diffusers(loaded, tmp_path):
    import torch
    from diffusers import StableDiffusionPipeline

    pipe, params = loaded
    pipe.save_pretrained(tmp_path / "saved", params)
    again, params2 = FlaxStableDiffusionPipeline.from_pretrained(tmp_path / "saved")
    assert again.scheduler.name == pipe.scheduler.name
    torch_pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "saved", safety_checker=None)
    torch_pipe.set_progress_bar_config(disable=True)
    latents = initial_latents()
    with torch.no_grad():
        ref = torch_pipe(PROMPTS, height=SIZE, width=SIZE, num_inference_steps=4, guidance_scale=GUIDANCE,
                         latents=torch.from_numpy(latents), output_type="np").images
    out = again(again.prepare_inputs(PROMPTS), params2, jax.random.PRNGKey(0), num_inference_steps=4,
                guidance_scale=GUIDANCE, height=SIZE, width=SIZE, latents=latents, return_trajectory=False)
    assert np.abs(np.asarray(out.images) - ref).max() <= 2e-3


# ---------------------------------------------------------------------------- CLI
def sdjax_cli(*args, **kw):
    env = dict(os.environ, XLA_FLAGS="", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "sdjax.cli", *args], capture_output=True, text=True, env=env, **kw)


def test_cli_generate(folder, tmp_path):
    r = sdjax_cli("generate", "--model", str(folder), "--prompt", "a cat", "--steps", "2", "--num-images", "2",
                  "--out", str(tmp_path / "gen"), "--scheduler", "ddim")
    assert r.returncode == 0, r.stderr
    settings = json.loads((tmp_path / "gen" / "settings.json").read_text())
    assert settings["images"] == ["image-000.png", "image-001.png"] and settings["scheduler"] == "ddim"
    from PIL import Image

    assert Image.open(tmp_path / "gen" / "image-001.png").size == (SIZE, SIZE)


def test_cli_user_errors_have_no_traceback(tmp_path):
    r = sdjax_cli("generate", "--model", str(tmp_path / "missing"), "--prompt", "x", "--out", str(tmp_path / "o"))
    assert r.returncode == 2
    assert "model folder not found" in r.stderr and "Traceback" not in r.stderr
    r = sdjax_cli("trajectories", "--model", str(tmp_path), "--prompts", str(tmp_path / "none.txt"), "--out", str(tmp_path))
    assert r.returncode == 2 and "prompts file not found" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_trajectories_resume_after_kill(folder, tmp_path):
    from sdjax.trajectories import load_shard

    prompts = [f"a {c} {s}" for c in ("red", "blue", "green") for s in ("circle", "square", "cat")]  # 9 prompts
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    out = tmp_path / "traj"
    args = ["trajectories", "--model", str(folder), "--prompts", str(tmp_path / "prompts.txt"), "--out", str(out),
            "--batch-size", "2", "--steps", "3", "--save-images"]
    env = dict(os.environ, XLA_FLAGS="", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "sdjax.cli", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        manifest = out / "manifest.json"
        if manifest.is_file() and len(json.loads(manifest.read_text())["shards"]) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be interrupted"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_before = len(json.loads((out / "manifest.json").read_text())["shards"])
    assert 2 <= n_before < 5

    r = sdjax_cli(*args)
    assert r.returncode == 0, r.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    indices = [i for s in manifest["shards"] for i in s["prompt_indices"]]
    assert indices == list(range(len(prompts))), "every prompt exactly once, in order"
    seen = []
    for s in manifest["shards"]:
        shard = load_shard(out / s["file"])
        assert shard["latents"].shape[1] == len(s["prompt_indices"])
        seen += shard["prompts"]
    assert seen == prompts
    assert len(list((out / "images").glob("*.png"))) == len(prompts)
    assert not list(out.rglob("*.tmp")), "temp files of the killed run are cleaned up"

    # A different setting in the same folder is refused, naming it.
    r = sdjax_cli(*[("4" if a == "3" else a) for a in args])
    assert r.returncode == 2 and "steps: 3 -> 4" in r.stderr
