"""Cascades: a text-to-image pipeline, then an upscaler (sdjax.pipelines.cascade), from Python, `sdjax generate`
and `sdjax viz`, on tiny random folders (32x32 images, then x4)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from sdjax import ConfigError, FlaxStableDiffusionUpscalePipeline
from sdjax.pipelines.cascade import run_cascade, stage_noise

PROMPTS = ["a red circle on the moon", "a blue square"]


@pytest.fixture(scope="module")
def upscaler_folder(tmp_path_factory):
    from tests.conftest import HAVE_REFERENCE, NO_REFERENCE

    if not HAVE_REFERENCE:
        pytest.skip(NO_REFERENCE)
    from sdjax.testing import build_tiny_upscaler

    return build_tiny_upscaler(tmp_path_factory.mktemp("tiny-upscaler"))


@pytest.fixture(scope="module")
def upscaler(upscaler_folder):
    return FlaxStableDiffusionUpscalePipeline.from_pretrained(upscaler_folder)


def test_cascade_is_two_programs_and_the_separate_runs(tiny_pipeline, upscaler):
    from sdjax.pipelines.engine import run_jit
    from sdjax.seeds import initial_noise, loop_key

    base, params = tiny_pipeline
    up, up_params = upscaler
    kw = dict(seed=3, steps=3, guidance=5.0, upscaler_steps=3, upscaler_guidance=2.0)
    before = run_jit._cache_size()
    out = run_cascade(base, params, up, up_params, PROMPTS, noise_level=50, **kw)
    assert run_jit._cache_size() == before + 2, "one compiled program per stage"
    assert out.low_res.shape == (2, 32, 32, 3) and out.images.shape == (2, 128, 128, 3)
    # other prompts and noise level: the same two programs
    run_cascade(base, params, up, up_params, ["a cat", "a dog"], noise_level=[0, 200], **kw)
    assert run_jit._cache_size() == before + 2
    # the same as running the two pipelines by hand with the seed rule of sdjax.seeds and cascade.stage_noise
    seeds = [3, 4]
    first = base(base.prepare_inputs(PROMPTS), params, loop_key(3), num_inference_steps=3, guidance_scale=5.0,
                 latents=initial_noise(seeds, (4, 16, 16)), return_trajectory=False)
    np.testing.assert_array_equal(np.asarray(first.images), np.asarray(out.low_res))
    ids, image = up.prepare_inputs(PROMPTS, np.asarray(first.images))
    second = up(ids, image, up_params, loop_key(3, 1), num_inference_steps=3, guidance_scale=2.0, noise_level=50,
                latents=stage_noise(seeds, (4, 32, 32), 1), low_res_noise=stage_noise(seeds, (3, 32, 32), 2),
                return_trajectory=False)
    np.testing.assert_allclose(np.asarray(second.images), np.asarray(out.images), atol=1e-6)
    # an image depends on its own seed only
    alone = run_cascade(base, params, up, up_params, PROMPTS[1:], noise_level=50, **(kw | {"seed": 4}))
    np.testing.assert_allclose(np.asarray(alone.images[0]), np.asarray(out.images[1]), atol=1e-5)


def sdjax_cli(*args):
    env = dict(os.environ, XLA_FLAGS="", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "sdjax.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600)


@pytest.mark.slow
def test_cli_generate_with_an_upscaler(tiny_folder, upscaler_folder, tmp_path):
    out = tmp_path / "gen"
    r = sdjax_cli("generate", "--model", tiny_folder, "--upscaler", upscaler_folder, "--prompt", "a cat", "--steps", 2,
                  "--upscaler-steps", 2, "--noise-level", 30, "--num-images", 2, "--scheduler", "ddim", "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert Image.open(out / "stage1-001.png").size == (32, 32)
    assert Image.open(out / "image-001.png").size == (128, 128)
    settings = json.loads((out / "settings.json").read_text())
    assert settings["upscaler"]["noise_level"] == 30 and settings["upscaler"]["steps"] == 2
    assert settings["upscaler"]["guidance_scale"] == 9.0  # diffusers' default for an upscaler that is not the toy's
    assert settings["images"] == ["image-000.png", "image-001.png"] and settings["height"] == 128
    # `sdjax upscale` on stage 1's second PNG with seed 0 + 1 is stage 2 of the cascade's second image (its input
    # rounded to uint8 by the PNG: close, not equal)
    r = sdjax_cli("upscale", "--model", upscaler_folder, "--image", out / "stage1-001.png", "--prompt", "a cat",
                  "--steps", 2, "--noise-level", 30, "--guidance", 9, "--seed", 1, "--out", tmp_path / "up")
    assert r.returncode == 0, r.stderr[-3000:]
    alone = np.asarray(Image.open(tmp_path / "up" / "image-000.png"), np.float32)
    cascade = np.asarray(Image.open(out / "image-001.png"), np.float32)
    assert alone.shape == (128, 128, 3) and np.abs(alone - cascade).mean() < 2.0, np.abs(alone - cascade).mean()
    settings = json.loads((tmp_path / "up" / "settings.json").read_text())
    assert settings["noise_level"] == 30 and settings["width"] == 128 and settings["images"] == ["image-000.png"]


@pytest.mark.slow
def test_cli_cascade_errors_are_one_line(tiny_folder, upscaler_folder, tmp_path):
    Image.new("RGB", (30, 30)).save(tmp_path / "odd.png")
    cases = [
        (("generate", "--model", tiny_folder, "--prompt", "a cat", "--noise-level", 5, "--out", tmp_path / "a"),
         "sdjax generate: error: --noise-level needs --upscaler PATH or --cascade"),
        (("generate", "--model", tiny_folder, "--upscaler", upscaler_folder, "--noise-level", 351, "--prompt", "a cat",
          "--out", tmp_path / "b"), "sdjax generate: error: `noise_level` must be in [0, 350]"),
        (("generate", "--model", tiny_folder, "--upscaler", tiny_folder, "--prompt", "a cat", "--out", tmp_path / "c"),
         "has no low_res_scheduler component"),
        (("generate", "--upscaler", upscaler_folder, "--cascade", "--prompt", "a cat", "--out", tmp_path / "d"),
         "not allowed with argument"),
        (("upscale", "--model", upscaler_folder, "--image", tmp_path / "odd.png", "--out", tmp_path / "e"),
         "the low-resolution `image` is 30x30; its sides must be positive multiples of 4"),
        (("upscale", "--model", upscaler_folder, "--image", tmp_path / "odd.png", "--noise-level", -1,
          "--out", tmp_path / "f"), "`noise_level` must be in [0, 350]"),
        (("upscale", "--model", tiny_folder, "--image", tmp_path / "odd.png", "--out", tmp_path / "g"),
         "has no low_res_scheduler component"),
    ]
    for args, message in cases:
        r = sdjax_cli(*args)
        assert r.returncode == 2, (args, r.stderr[-2000:])
        assert message in r.stderr and "Traceback" not in r.stderr, (args, r.stderr[-2000:])


@pytest.mark.slow
def test_viz_of_both_stages(tiny_pipeline, upscaler, tmp_path):
    from sdjax.viz import render, run_live_cascade

    base, params = tiny_pipeline
    up, up_params = upscaler
    first, second = run_live_cascade(base, params, up, up_params, PROMPTS, seed=0, steps=3, guidance=5.0,
                                     upscaler_steps=3, upscaler_guidance=2.0, noise_level=40)
    assert first.latents.shape[1:] == (2, 4, 16, 16) and second.latents.shape == (4, 2, 4, 32, 32)  # PLMS, DDIM
    assert second.unet_extras["extra_channels"].shape == (2, 3, 32, 32)
    assert list(second.unet_extras["class_labels"]) == [40, 40] and second.settings["noise_level"] == 40
    files = render(up, up_params, second, tmp_path / "stage2", columns=3, completion_steps=1)
    assert Image.open(files["grid"]).size[0] > 0
    # the upscaler's K-step completions are drawn (its run carries the noised low-resolution image and level)
    assert "ddim_completion" in json.loads(files["convergence_json"].read_text())
    # the one-step DDIM completion of the last step is the last x̂0, which saw the same low-res image and level
    from sdjax.viz.completion import ddim_completions

    last = ddim_completions(up, up_params, second, [2], num_steps=1)
    np.testing.assert_allclose(last[0], second.x0[2], rtol=1e-4, atol=1e-4)
    second.unet_extras = None  # the completion needs the upscaler's conditioning
    with pytest.raises(ConfigError, match="pass class_labels"):
        ddim_completions(up, up_params, second, [2], num_steps=1)


def test_no_toy_upscaler_is_one_clear_line(capsys, tmp_path, monkeypatch):
    """--cascade and `sdjax upscale` without --model need the toy upscaler; while none is shipped (or it is missing)
    they stop before loading anything, with one line saying so."""
    import sdjax.assets
    from tests.badinput import run_cli

    monkeypatch.setattr(sdjax.assets, "TOY_UPSCALER", tmp_path / "no-upscaler")
    Image.new("RGB", (32, 32)).save(tmp_path / "small.png")
    for argv in (["upscale", "--image", tmp_path / "small.png", "--out", tmp_path / "a"],
                 ["generate", "--cascade", "--prompt", "a cat", "--out", tmp_path / "b"]):
        line = run_cli(capsys, argv, tmp_path, "ships none yet", out=argv[-1])
        assert "--upscaler PATH" in line and "docs/cascade.md" in line
