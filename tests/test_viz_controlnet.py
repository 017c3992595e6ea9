"""viz/ on a ControlNet run (tiny random pipeline, a ControlNet made from its UNet with the zero convolutions
perturbed so that it acts): the grid shows the control image, the K-step completions see the ControlNet as the run
did, and `sdjax viz --controlnet PATH --control-image IMG` draws the same."""

import dataclasses

import jax
import numpy as np
import pytest
from PIL import Image

from sdjax import SdjaxError
from sdjax.cli import main
from sdjax.io import write_png
from sdjax.models import ControlNetModel
from sdjax.pipelines import FlaxStableDiffusionControlNetPipeline
from sdjax.viz import choose_steps, render, run_live
from sdjax.viz.completion import ddim_completions
from sdjax.viz.grid import HEADER_H, MARGIN, PROMPT_W, TITLE_H, grid_size

PROMPTS = ["a red circle on the moon", "a blue square"]
STEPS = 4
COLUMNS = 3
CELL = 128  # 32 px images, upscaled 4x


def silhouette(size=32):
    """A white disc on black, off-centre: float [H, W, 3] in [0, 1]."""
    y, x = np.mgrid[0:size, 0:size] + 0.5
    disc = (np.hypot(x - 20, y - 12) < 8).astype(np.float32)
    return np.repeat(disc[..., None], 3, axis=-1)


@pytest.fixture(scope="module")
def controlled(tiny_pipeline, tmp_path_factory):
    """(ControlNet pipeline with DDIM, params, the ControlNet's folder)."""
    pipe, params = tiny_pipeline
    controlnet, cn_params = ControlNetModel.from_unet(pipe.unet, params["unet"],
                                                      conditioning_embedding_out_channels=(8, 16),
                                                      rng=jax.random.PRNGKey(3))
    leaves, tree = jax.tree_util.tree_flatten(cn_params)
    keys = jax.random.split(jax.random.PRNGKey(4), len(leaves))
    cn_params = jax.tree_util.tree_unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape)
                                                    for x, k in zip(leaves, keys)])
    folder = tmp_path_factory.mktemp("viz-controlnet")
    controlnet.save_pretrained(folder, cn_params)
    cpipe = FlaxStableDiffusionControlNetPipeline.from_pipe(pipe.with_scheduler("ddim"), controlnet=controlnet)
    return cpipe, {**params, "controlnet": (cn_params,)}, folder


@pytest.fixture(scope="module")
def live(controlled, tmp_path_factory):
    pipe, params, _ = controlled
    data = run_live(pipe, params, PROMPTS, seed=0, steps=STEPS, guidance=5.0, control_image=silhouette(),
                    control_scale=0.8)
    out = tmp_path_factory.mktemp("viz-controlnet-live")
    return data, render(pipe, params, data, out, columns=COLUMNS, completion_steps=2)


@pytest.mark.slow
def test_grid_shows_the_control_image(live):
    data, files = live
    assert data.settings["controlnet_conditioning_scale"] == 0.8 and data.control["scales"] == [0.8]
    assert data.control["images"][0].shape == (len(PROMPTS), 3, 32, 32)
    n_cols = len(choose_steps(STEPS, COLUMNS)[0])
    assert Image.open(files["grid"]).size == grid_size(len(PROMPTS), n_cols, 3, CELL, n_control=1)
    img = np.asarray(Image.open(files["grid"]).convert("RGB"))
    # the control column right after the prompt, centred on each sample's group of 3 rows
    group_h = 3 * (CELL + 6) - 6
    y = MARGIN + TITLE_H + HEADER_H + (group_h - CELL) // 2
    cell = img[y:y + CELL, MARGIN + PROMPT_W:MARGIN + PROMPT_W + CELL]
    expected = np.round(silhouette() * 255).astype(np.uint8)
    assert np.array_equal(cell[::4, ::4], expected)


@pytest.mark.slow
def test_completions_see_the_controlnet(controlled, live):
    """One DDIM step from x_t is the run's own x̂0 only if the completion runs the ControlNet as the run did."""
    pipe, params, _ = controlled
    data, _ = live
    steps = [0, STEPS - 1]
    one = ddim_completions(pipe, params, data, steps, num_steps=1)
    np.testing.assert_allclose(one, data.x0[steps], atol=2e-4)
    without = ddim_completions(pipe, params, dataclasses.replace(data, control=None), steps, num_steps=1)
    assert np.abs(without - data.x0[steps]).max() > 100 * 2e-4, "the ControlNet changes the model's prediction"


def test_run_live_control_errors(controlled, tiny_pipeline):
    pipe, params, _ = controlled
    with pytest.raises(SdjaxError, match="--control-image needs --controlnet"):
        run_live(tiny_pipeline[0], tiny_pipeline[1], PROMPTS, steps=2, control_image=silhouette())
    with pytest.raises(SdjaxError, match="give its control image"):
        run_live(pipe, params, PROMPTS, steps=2)
    with pytest.raises(SdjaxError, match="--control-image with --image"):
        run_live(pipe, params, PROMPTS, steps=2, control_image=silhouette(), image=silhouette())
    with pytest.raises(SdjaxError, match="2 control images for 1 ControlNet"):
        run_live(pipe, params, PROMPTS, steps=2, control_image=[silhouette(), silhouette()])


@pytest.mark.slow
def test_cli_viz_with_a_controlnet(controlled, tiny_folder, tmp_path, capsys):
    _, _, folder = controlled
    control = tmp_path / "silhouette.png"
    write_png(control, np.round(silhouette() * 255).astype(np.uint8))
    out = tmp_path / "viz"
    assert main(["viz", "--model", str(tiny_folder), "--scheduler", "ddim", "--prompt", PROMPTS[0],
                 "--controlnet", str(folder), "--control-image", str(control), "--control-scale", "0.8",
                 "--steps", str(STEPS), "--columns", str(COLUMNS), "--completion-steps", "1", "--out", str(out)]) == 0
    n_cols = len(choose_steps(STEPS, COLUMNS)[0])
    assert Image.open(out / "grid.png").size == grid_size(1, n_cols, 3, CELL, n_control=1)
    capsys.readouterr()
    for argv, message in (
            (["--control-image", str(control)], "--control-image needs --controlnet PATH"),
            (["--controlnet", str(folder)], "0 --control-image for 1 --controlnet"),
            (["--controlnet", str(folder), "--control-image", str(control), "--image", str(control)],
             "--controlnet and --image/--mask/--strength cannot be combined")):
        assert main(["viz", "--model", str(tiny_folder), "--prompt", "a red circle", *argv,
                     "--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert main(["viz", "--shard", str(tmp_path / "s.safetensors"), "--controlnet", str(folder),
                 "--out", str(tmp_path / "bad")]) == 2
    assert "need a live run (--prompt TEXT), not --shard" in capsys.readouterr().err
