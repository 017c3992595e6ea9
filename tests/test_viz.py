"""viz/: the pictures of one-step completions, on a tiny random pipeline (32x32 images, 16x16 latents).

One live run (DDIM, attention maps on) is rendered once; the tests read its files and numbers.
"""

import json

import numpy as np
import pytest
from PIL import Image

from sdjax import SdjaxError
from sdjax.cli import main
from sdjax.trajectories import run_trajectories
from sdjax.viz import choose_steps, decode, from_shard, render, run_live
from sdjax.viz.animate import frame_size
from sdjax.viz.attention import attention_size, select_words
from sdjax.viz.completion import ddim_completions
from sdjax.viz.grid import GAP, HEADER_H, MARGIN, PROMPT_W, ROWLABEL_W, TITLE_H, grid_size


PROMPTS = ["a red circle on the moon", "a blue square"]
STEPS = 6
COLUMNS = 4
K = 2
CELL = 128  # 32 px images, upscaled 4x


@pytest.fixture(scope="module")
def folder(tiny_folder):
    return tiny_folder


@pytest.fixture(scope="module")
def loaded(tiny_pipeline):
    pipe, params = tiny_pipeline
    return pipe.with_scheduler("ddim"), params


@pytest.fixture(scope="module")
def live(loaded, tmp_path_factory):
    pipe, params = loaded
    data = run_live(pipe, params, PROMPTS, seed=0, steps=STEPS, guidance=5.0, attentions=True)
    out = tmp_path_factory.mktemp("viz-live")
    files = render(pipe, params, data, out, columns=COLUMNS, completion_steps=K)
    return data, files, decode(pipe, params["vae"], data)


def test_files_and_pixel_sizes(live):
    data, files, _ = live
    for name in ("grid", "animation", "convergence", "convergence_json", "attention"):
        assert files[name].is_file(), name
    n_cols = len(choose_steps(STEPS, COLUMNS)[0])
    assert Image.open(files["grid"]).size == grid_size(len(PROMPTS), n_cols, 3, CELL)
    assert Image.open(files["convergence"]).size == (1300, 520)
    gif = Image.open(files["animation"])
    assert gif.size == frame_size(len(PROMPTS), CELL)
    assert gif.n_frames == STEPS + 1  # every step, then the final image
    assert Image.open(files["attention"]).size[0] == attention_size([1], n_cols, CELL)[0]


def test_grid_has_one_column_per_chosen_step(live):
    data, files, _ = live
    steps, _ = choose_steps(STEPS, COLUMNS)
    assert steps[0] == 0 and steps[-1] == STEPS - 1 and len(steps) == COLUMNS
    img = np.asarray(Image.open(files["grid"]).convert("RGB")).astype(int)
    # the first row of the first sample (x_t): count the image cells along its middle line
    y = MARGIN + TITLE_H + HEADER_H + CELL // 2
    x_start = MARGIN + PROMPT_W + ROWLABEL_W - 2
    line = (np.abs(img[y, x_start:] - 255).sum(-1) > 0).astype(int)
    runs = np.diff(np.concatenate([[0], line, [0]]))
    widths = np.flatnonzero(runs == -1) - np.flatnonzero(runs == 1)
    assert len(widths) == COLUMNS and all(w == CELL for w in widths), widths
    # the x̂0 cell of the first column is the decoded x̂0 of step 0, upscaled with nearest
    y0 = MARGIN + TITLE_H + HEADER_H + CELL + GAP
    cell = img[y0:y0 + CELL, x_start + 2:x_start + 2 + CELL]
    assert np.array_equal(cell[::4, ::4], live[2].x0[0, 0])


def test_convergence_reaches_zero_at_the_final_step(live):
    data, files, _ = live
    numbers = json.loads(files["convergence_json"].read_text())
    assert numbers["steps"] == list(range(STEPS + 1))
    assert numbers["noise_level_name"] == "sqrt(1-alpha_bar)"
    for s in numbers["samples"]:
        for key in ("pixel_mse", "latent_mse", "noisy_pixel_mse", "noisy_latent_mse"):
            assert len(s[key]) == STEPS + 1 and s[key][-1] == 0.0 and min(s[key][:-1]) >= 0
        assert len(s["ddim_latent_mse"]) == COLUMNS
        # DDIM's last step barely moves x̂0: the last completion is (almost) the final sample
        assert s["latent_mse"][-2] < 1e-2 * s["latent_mse"][0]


def test_attention_maps_sum_to_one_over_tokens(loaded, live):
    import jax
    import jax.numpy as jnp

    from sdjax.models.attention import ATTENTION_PROBS

    pipe, params = loaded
    # each cross-attention layer's head-averaged probabilities, before the average over layers
    x = jax.random.normal(jax.random.PRNGKey(1), (len(PROMPTS), 4, 16, 16))
    apply = jax.jit(lambda p, x, ids: pipe.unet.apply({"params": p["unet"]}, x, jnp.array([500, 500]),
                                                      pipe.encode_prompt(p, ids), mutable=[ATTENTION_PROBS]))
    _, sown = apply(params, x, pipe.prepare_inputs(PROMPTS))
    layers = jax.tree_util.tree_leaves(sown[ATTENTION_PROBS])
    assert len(layers) >= 2
    for probs in layers:
        assert probs.shape[-1] == 77
        np.testing.assert_allclose(np.asarray(probs).sum(-1), 1.0, atol=1e-5)
    # and what the figure draws: the trajectory's maps, averaged over heads and layers, still sum to 1
    data, _, _ = live
    maps = data.attention_maps
    assert maps.shape == (STEPS, len(PROMPTS), 16, 16, 77)
    np.testing.assert_allclose(maps.sum(-1), 1.0, atol=1e-4)


def test_one_ddim_step_is_the_models_own_x0(loaded, live):
    pipe, params = loaded
    data, _, _ = live
    steps, _ = choose_steps(STEPS, COLUMNS)
    one = ddim_completions(pipe, params, data, steps, num_steps=1)
    np.testing.assert_allclose(one, data.x0[steps], atol=2e-4)


def test_sigma_space_completion_converts_to_alpha_space(loaded):
    pipe, params = loaded
    euler = pipe.with_scheduler("euler")
    data = run_live(euler, params, PROMPTS[:1], steps=3, guidance=5.0)
    assert data.sigma_space and data.noise_level_name == "sigma"
    one = ddim_completions(euler, params, data, [0, 2], num_steps=1)
    np.testing.assert_allclose(one, data.x0[[0, 2]], atol=2e-3 * np.abs(data.x0).max())


def test_viz_from_shard_equals_live(loaded, folder, live, tmp_path, capsys):
    pipe, params = loaded
    data, files, _ = live
    run_trajectories(pipe, params, PROMPTS, tmp_path / "traj", batch_size=len(PROMPTS), steps=STEPS,
                     guidance_scale=5.0, seed=0, progress=False)
    path = tmp_path / "traj" / "shard-00000.safetensors"
    shard = from_shard(path)
    assert shard.prompts == data.prompts and shard.seeds == data.seeds
    np.testing.assert_allclose(shard.latents, data.latents, atol=1e-4)
    np.testing.assert_allclose(shard.x0, data.x0, atol=1e-4)
    np.testing.assert_array_equal(shard.timesteps, data.timesteps)
    out = tmp_path / "viz"
    assert main(["viz", "--shard", str(path), "--model", str(folder), "--columns", str(COLUMNS),
                 "--completion-steps", "0", "--out", str(out)]) == 0  # K-step rows: same code as live
    assert "attention.png needs a live run" in capsys.readouterr().err
    assert not (out / "attention.png").exists()
    a, b = (json.loads((d / "convergence.json").read_text()) for d in (files["grid"].parent, out))
    for sa, sb in zip(a["samples"], b["samples"]):
        for key in ("pixel_mse", "latent_mse", "noisy_pixel_mse"):
            np.testing.assert_allclose(sa[key], sb[key], rtol=1e-3, atol=1e-6)
    ga, gb = (np.asarray(Image.open(d / "grid.png").convert("RGB")).astype(int) for d in (files["grid"].parent, out))
    # the x_t and x̂0 cells of the first sample (without the K-step row, labels and final image move)
    y0, x0 = MARGIN + TITLE_H + HEADER_H, MARGIN + PROMPT_W + ROWLABEL_W
    cells = np.s_[y0:y0 + 2 * CELL + GAP, x0:x0 + COLUMNS * (CELL + GAP)]
    assert np.abs(ga[cells] - gb[cells]).mean() < 0.5
    assert Image.open(out / "completions.gif").n_frames == STEPS + 1


def test_bad_inputs(loaded, folder, tmp_path, capsys):
    pipe, _ = loaded
    with pytest.raises(SdjaxError, match=r"'zebra' is not a word of the prompt.*red, circle, on, the"):
        select_words(pipe.tokenizer, ["a red circle on the moon"], ["zebra"])
    assert [w for w, _ in select_words(pipe.tokenizer, ["a red circle on the moon"], None)[0]][:2] == ["red", "circle"]
    steps, note = choose_steps(STEPS, 50)
    assert steps == list(range(STEPS)) and "showing all 6" in note
    assert main(["viz", "--model", str(folder), "--prompt", "a red circle", "--tokens", "zebra",
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "'zebra' is not a word" in err and "red, circle" in err and "Traceback" not in err
    assert main(["viz", "--shard", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "o")]) == 2
    assert "trajectory shard not found" in capsys.readouterr().err
    assert main(["viz", "--model", str(folder), "--out", str(tmp_path / "o")]) == 2
    assert "--prompt TEXT is required" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_on_the_toy_model(tmp_path, capsys):
    """`sdjax demo` end to end, offline; on a trained model the completions approach the final image."""
    from sdjax.assets import TOY_MODEL

    if not (TOY_MODEL / "model_index.json").is_file():
        pytest.skip("the toy model is not in sdjax/assets/toy-shapes yet")
    out = tmp_path / "demo"
    # fewer steps and columns than the default demo, to keep the suite short; `sdjax demo` itself is timed by hand
    assert main(["demo", "--steps", "12", "--columns", "4", "--completion-steps", "1", "--out", str(out)]) == 0
    assert str(out.resolve()) in capsys.readouterr().out
    for name in ("grid.png", "completions.gif", "convergence.png", "convergence.json", "attention.png",
                 "controlnet.png"):  # the ControlNet panel: the shipped toy ControlNet on the toy model
        assert (out / name).is_file(), name
    numbers = json.loads((out / "convergence.json").read_text())
    t = numbers["num_steps"]
    for s in numbers["samples"]:
        px = np.asarray(s["pixel_mse"])
        assert px[-1] == 0 and px[t - 1] < 0.1 * px[0]                   # the last completion is ~ the final image
        assert np.median(px[: t // 2]) > np.median(px[t // 2: t])      # and they get closer on the way
