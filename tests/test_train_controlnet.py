"""The toy ControlNet trainer (train/controlnet.py): silhouettes, config errors, a few steps on the tiny random
folder as the frozen base (resumed midway), and the export loading in diffusers' ControlNetModel with the same
residuals."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from sdjax.errors import ConfigError
from sdjax.train import controlnet as cn_train
from sdjax.train import data
from sdjax.train.config import load_config


def test_silhouette_is_the_rendered_shape():
    for index in range(6):
        image, silhouette, (color, shape, background) = data.shapes_silhouette_example(3, index)
        assert silhouette.shape == (32, 32) and silhouette.dtype == np.uint8
        fg = np.array(data.COLORS[data.COLOR_NAMES[color]]) * 255
        inside, outside = silhouette == 255, silhouette == 0
        assert inside.sum() > 20 and outside.sum() > 20
        assert np.abs(image[inside].astype(float) - fg).max() <= 1  # full coverage: the shape's own color
        assert np.array_equal(data.shapes_example(3, index)[0], image)  # the LDM's image, unchanged


def tiny_cfg(tiny_folder, **extra):
    return load_config(cn_train.Config, "shapes_controlnet", dict(
        base_model=str(tiny_folder), num_train_images=16, batch_size=8, num_steps=4, learning_rate=1e-3,
        warmup_steps=1, checkpoint_every=2, keep_checkpoints=2, log_every=1,
        conditioning_embedding_out_channels=[8, 16]) | extra)


def test_config_errors(tiny_folder):
    cfg = tiny_cfg(tiny_folder, conditioning_embedding_out_channels=[8, 16, 32])
    pipe, params = cn_train.load_base(cfg)
    with pytest.raises(ConfigError, match=r"'conditioning_embedding_out_channels' = \[8, 16, 32\] downsamples the "
                                          r"control image 4x, the base model's VAE 2x: give 2 widths"):
        cn_train.make_controlnet(cfg, pipe, params)
    with pytest.raises(ConfigError, match="conditioning_embedding_out_channels"):
        tiny_cfg(tiny_folder, conditioning_embedding_out_channels=[0, 16])
    with pytest.raises(ConfigError, match="fewer than one batch"):
        tiny_cfg(tiny_folder, num_train_images=4)


@pytest.mark.slow
def test_trains_resumes_and_exports_for_diffusers(tiny_folder, tmp_path):
    import diffusers
    import torch

    from sdjax.models import ControlNetModel
    from sdjax.testing import rel_err

    cfg = tiny_cfg(tiny_folder)
    workdir = tmp_path / "run"
    first = cn_train.train_and_evaluate(cfg, workdir, until_step=2, progress=False)
    assert first["steps"] == 2 and not (workdir / "controlnet").exists()
    summary = cn_train.train_and_evaluate(cfg, workdir, progress=False)  # resumed from step 2
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in rows)
    out = workdir / "controlnet"
    assert summary["controlnet"] == str(out)
    ours, params = ControlNetModel.from_pretrained(out)
    assert max(float(np.abs(x).max()) for x in jax.tree_util.tree_leaves(params["controlnet_down_blocks_0"])) > 0, \
        "training moved the zero convolutions"
    ref = diffusers.ControlNetModel.from_pretrained(out).eval()
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((2, 4, 16, 16)).astype(np.float32)
    context = rng.standard_normal((2, 77, ours.cross_attention_dim)).astype(np.float32)
    cond = rng.uniform(size=(2, 3, 32, 32)).astype(np.float32)
    t = np.array([10, 700])
    down, mid = ours.apply({"params": params}, sample, t, context, cond, return_dict=False)
    with torch.no_grad():
        rdown, rmid = ref(torch.from_numpy(sample), torch.from_numpy(t), torch.from_numpy(context),
                          torch.from_numpy(cond), return_dict=False)
    errs = [rel_err(a, b.numpy()) for a, b in zip((*down, mid), (*rdown, rmid))]
    print(f"\n[toy controlnet export] diffusers residuals max rel err {max(errs):.2e}")
    assert max(errs) <= 1e-5


def test_shipped_controlnet_fits_the_toy_model():
    from sdjax.assets import toy_controlnet_path, toy_model_path
    from sdjax.pipelines import FlaxStableDiffusionControlNetPipeline

    pipe, params = FlaxStableDiffusionControlNetPipeline.from_pretrained(toy_model_path(),
                                                                         controlnet=toy_controlnet_path())
    assert len(pipe.controlnet) == 1 and pipe.controlnet[0].cond_downscale() == pipe.vae_scale_factor
    pipe.check_params(params)
