"""The toy cascade's stage 2 trainer (train/upscaler.py): the f=2 autoencoder at 64x64, the super-resolution UNet,
resume, export as a diffusers StableDiffusionUpscalePipeline folder, config errors. Tiny configs."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from sdjax.errors import ConfigError
from sdjax.train import autoencoder, upscaler
from sdjax.train.checkpointing import Checkpointer
from sdjax.train.config import load_config

TINY_AE = dict(num_train_images=32, num_eval_images=8, batch_size=8, num_steps=3, warmup_steps=1, checkpoint_every=0,
               log_every=1, scale_images=16,
               vae=dict(block_out_channels=[8, 8], layers_per_block=1, latent_channels=4, norm_num_groups=4,
                        mid_block_add_attention=False))
TINY_UP = dict(num_train_images=32, batch_size=8, num_steps=6, warmup_steps=1, checkpoint_every=3, keep_checkpoints=3,
               log_every=1, max_noise_level=100,
               unet=dict(block_out_channels=[16, 16], layers_per_block=1, down_block_types=["DownBlock2D",
                         "CrossAttnDownBlock2D"], up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
                         only_cross_attention=[False, True], attention_head_dim=2, norm_num_groups=8))


def tree_equal(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("upscaler")
    ae_cfg = load_config(autoencoder.Config, "shapes_upscaler_autoencoder", TINY_AE)
    autoencoder.train_and_evaluate(ae_cfg, root / "ae", progress=False)
    cfg = load_config(upscaler.Config, "shapes_upscaler", TINY_UP | {"autoencoder_dir": str(root / "ae")})
    summary = upscaler.train_and_evaluate(cfg, root / "up", progress=False)
    return root / "up", cfg, summary


def test_shipped_configs_are_valid():
    cfg = load_config(upscaler.Config, "shapes_upscaler")
    ae = load_config(autoencoder.Config, "shapes_upscaler_autoencoder")
    assert cfg.image_size == ae.image_size == 64 and len(ae.vae["block_out_channels"]) == 2  # f = 2: 32 -> 64


def test_config_errors():
    with pytest.raises(ConfigError, match="'max_noise_level' = 1000: must be < 1000"):
        load_config(upscaler.Config, "shapes_upscaler", {"max_noise_level": 1000})
    with pytest.raises(ConfigError, match="'num_class_embeds' is filled in"):
        load_config(upscaler.Config, "shapes_upscaler", {"unet": {"num_class_embeds": 10}})
    with pytest.raises(ConfigError, match="'low_res_beta_schedule' = 'cosine'"):
        load_config(upscaler.Config, "shapes_upscaler", {"low_res_beta_schedule": "cosine"})
    with pytest.raises(ConfigError, match="low_res_beta_start = 0.5, low_res_beta_end = 0.02"):
        load_config(upscaler.Config, "shapes_upscaler", {"low_res_beta_start": 0.5})


def test_downsample_is_the_block_mean():
    x = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3)).astype(np.uint8)
    low = upscaler.downsample(x, 2)
    assert low.shape == (2, 4, 4, 3) and low.dtype == np.uint8
    assert low[1, 2, 3, 0] == round(x[1, 4:6, 6:8, 0].astype(float).mean())


def test_rescaled_vae_decodes_the_same_images():
    from sdjax.models.autoencoder_kl import AutoencoderKL

    vae = AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, scaling_factor=0.5)
    params = vae.init_weights(jax.random.PRNGKey(0))
    params = jax.tree_util.tree_map(lambda p: p + 0.1 * jax.random.normal(jax.random.PRNGKey(1), p.shape), params)
    new, new_params = upscaler.rescale_vae(vae, params, vae.scaling_factor)
    assert new.scaling_factor == 0.08333
    c = 0.5 / 0.08333
    z = jax.random.normal(jax.random.PRNGKey(2), (1, 4, 4, 4))
    before = vae.apply({"params": params}, z, method=vae.decode)
    after = new.apply({"params": new_params}, z * c, method=new.decode)
    np.testing.assert_allclose(np.asarray(after), np.asarray(before), atol=2e-5)
    x = jax.random.uniform(jax.random.PRNGKey(3), (1, 3, 8, 8)) * 2 - 1
    pa, pb = vae.apply({"params": params}, x, method=vae.encode), new.apply({"params": new_params}, x, method=new.encode)
    np.testing.assert_allclose(np.asarray(pb.mean), np.asarray(pa.mean) * c, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(pb.std), np.asarray(pa.std) * c, rtol=1e-4)


@pytest.mark.slow
def test_upscaler_trains_and_exports(trained):
    workdir, cfg, summary = trained
    assert summary["step_compiles_this_run"] == 1
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, cfg.num_steps + 1))
    assert all(np.isfinite(r["loss"]) for r in rows)
    folder = workdir / "pipeline"
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionUpscalePipeline" and index["max_noise_level"] == 100
    unet_cfg = json.loads((folder / "unet" / "config.json").read_text())
    assert unet_cfg["in_channels"] == 7 and unet_cfg["num_class_embeds"] == 101
    assert json.loads((folder / "vae" / "config.json").read_text())["scaling_factor"] == 0.08333


@pytest.mark.slow
def test_upscaler_resume_gives_the_same_parameters(trained, tmp_path):
    straight, cfg, _ = trained
    upscaler.train_and_evaluate(cfg, tmp_path, until_step=4, final_save=False, progress=False, export=False)
    assert Checkpointer(tmp_path, 3, 3).latest_step() == 3
    resumed = upscaler.train_and_evaluate(cfg, tmp_path, progress=False, export=False)
    assert resumed["step_compiles_this_run"] == 0
    vae, _ = upscaler.ldm.load_autoencoder(cfg.autoencoder_dir)
    text_encoder = upscaler.load_text_model(cfg)[0]
    unet = upscaler.make_unet(cfg, vae, text_encoder)
    states = []
    for workdir in (tmp_path, straight):
        ck = Checkpointer(workdir, 3, 3)
        states.append(ck.restore(jax.eval_shape(lambda: upscaler.create_train_state(cfg, unet)), cfg.num_steps))
        ck.close()
    assert tree_equal(states[0]["params"], states[1]["params"]) and tree_equal(states[0]["ema"], states[1]["ema"])
    # the class-embedding table is a smooth function of the level: neighbouring levels are close
    table = np.asarray(upscaler.level_table(cfg, states[0]["ema"]["level_proj"]))
    assert table.shape == (cfg.max_noise_level + 1, unet._time_embed_dim())
    assert np.abs(np.diff(table, axis=0)).mean() < 0.2 * np.abs(table).mean()


@pytest.mark.slow
@pytest.mark.parity
def test_export_runs_in_sdjax_and_diffusers(trained, tmp_path):
    import torch
    from diffusers import StableDiffusionUpscalePipeline

    from sdjax import FlaxStableDiffusionUpscalePipeline

    workdir, cfg, _ = trained
    out = upscaler.export_from_workdir(workdir, tmp_path / "again")  # as `sdjax train export` does
    pipe, params = FlaxStableDiffusionUpscalePipeline.from_pretrained(out)
    prompts = ["a red circle on a white background", "a blue square on a black background"]
    low = np.random.default_rng(0).uniform(0, 1, (2, 32, 32, 3)).astype(np.float32)
    latents = np.random.default_rng(1).standard_normal((2, 4, 32, 32)).astype(np.float32)
    tpipe = StableDiffusionUpscalePipeline.from_pretrained(out)
    tpipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        theirs = tpipe(prompts, image=low, num_inference_steps=3, guidance_scale=3.0, noise_level=50,
                       generator=torch.Generator().manual_seed(0), latents=torch.from_numpy(latents),
                       output_type="np").images
    noise = torch.randn((2, 3, 32, 32), generator=torch.Generator().manual_seed(0)).numpy()
    ids, image = pipe.prepare_inputs(prompts, low)
    ours = pipe(ids, image, params, jax.random.PRNGKey(0), num_inference_steps=3, guidance_scale=3.0, noise_level=50,
                latents=latents, low_res_noise=noise).images
    assert ours.shape == theirs.shape == (2, 64, 64, 3)
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4)
    # the export command picks the upscaler's exporter for an upscaler workdir
    assert upscaler.is_upscaler_workdir(workdir) and not upscaler.is_upscaler_workdir(cfg.autoencoder_dir)
