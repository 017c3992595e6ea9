"""The toy LDM trainers (train/): data, tokenizer, both stages, resume after a kill, export, config errors.

Tiny configs so that the whole file runs in about two minutes on 2 CPU cores. conftest.py gives jax 8
host devices, so the stage-2 steps here run data-parallel over 8 devices.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from sdjax.errors import ConfigError
from sdjax.train import autoencoder, data, ldm
from sdjax.train.checkpointing import Checkpointer
from sdjax.train.config import load_config

ROOT = Path(__file__).resolve().parents[1]

TINY_AE = dict(num_train_images=64, num_eval_images=16, image_size=32, batch_size=8, num_steps=20,
               vae=dict(block_out_channels=[8, 8], layers_per_block=1, latent_channels=4, norm_num_groups=4),
               learning_rate=5e-3, warmup_steps=1, checkpoint_every=4, keep_checkpoints=3, log_every=1,
               scale_images=32, disc_start=10)
TINY_LDM = dict(num_train_images=64, image_size=32, batch_size=8, num_steps=30, model_max_length=12,
                unet=dict(block_out_channels=[16], layers_per_block=1, down_block_types=["CrossAttnDownBlock2D"],
                          up_block_types=["CrossAttnUpBlock2D"], attention_head_dim=2, norm_num_groups=8),
                text_encoder=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2),
                learning_rate=1e-3, warmup_steps=1, checkpoint_every=10, keep_checkpoints=3, log_every=1)


def tiny_config(schema, shipped: str, overrides: dict):
    """A shipped config (the one source of defaults) with the tiny test values over it."""
    return load_config(schema, shipped, overrides)


def tree_equal(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def restore(module, cfg, workdir, step, *models):
    ck = Checkpointer(workdir, 1, 10)
    state = ck.restore(jax.eval_shape(lambda: module.create_train_state(cfg, *models)), step)
    ck.close()
    return state


@pytest.fixture(scope="module")
def trained_ae(tmp_path_factory):
    """A tiny stage 1 run to the end: its workdir (vae/, summary.json, metrics.jsonl)."""
    workdir = tmp_path_factory.mktemp("ae")
    cfg = tiny_config(autoencoder.Config, "shapes_autoencoder", TINY_AE)
    summary = autoencoder.train_and_evaluate(cfg, workdir, progress=False)
    return workdir, cfg, summary


# ---------------------------------------------------------------------- data
def test_shapes_dataset_is_deterministic():
    a, b = data.shapes_dataset(40, seed=3), data.shapes_dataset(40, seed=3)
    np.testing.assert_array_equal(a.images, b.images)
    assert a.captions == b.captions
    # image i depends only on (seed, i): a prefix of a larger set is the smaller set
    np.testing.assert_array_equal(data.shapes_dataset(10, seed=3).images, a.images[:10])
    assert not np.array_equal(data.shapes_dataset(40, seed=4).images, a.images)
    assert a.images.shape == (40, 32, 32, 3) and a.images.dtype == np.uint8
    assert data.shapes_dataset(2, seed=0, image_size=64).images.shape == (2, 64, 64, 3)
    for caption, (c, s, bg) in zip(a.captions, a.labels):
        assert caption == f"a {data.COLOR_NAMES[c]} {data.SHAPES[s]} on a {data.BACKGROUND_NAMES[bg]} background"
    # the background is the corner pixel's color, the shape's color is in the image
    for img, (c, s, bg) in zip(a.images, a.labels):
        assert np.allclose(img[0, 0] / 255, data.BACKGROUNDS[data.BACKGROUND_NAMES[bg]], atol=0.01) or \
            np.allclose(img[-1, -1] / 255, data.BACKGROUNDS[data.BACKGROUND_NAMES[bg]], atol=0.01)
    # batches: a function of (seed, step); an epoch is a permutation
    assert np.array_equal(data.batch_indices(40, 8, 0, 7), data.batch_indices(40, 8, 0, 7))
    epoch = np.concatenate([data.batch_indices(40, 8, 0, s) for s in range(5)])
    assert sorted(epoch) == list(range(40))


def test_shapes_anycolor_recolours_half_of_the_shapes_images():
    """"shapes-anycolor" image i is shapes image i (same seed), its shape in a random RGB colour half of the time;
    deterministic in (seed, i); the generated datasets' train and held-out images are disjoint."""
    import re

    base, ds = data.shapes_dataset(200, seed=2), data.shapes_anycolor_dataset(200, seed=2)
    np.testing.assert_array_equal(data.shapes_anycolor_dataset(50, seed=2).images, ds.images[:50])
    assert ds.labels is None and ds.images.shape == (200, 32, 32, 3)
    recoloured = np.array([c.startswith("a #") for c in ds.captions])
    assert 0.35 < recoloured.mean() < 0.65, recoloured.mean()
    for i, (img, ref, caption, new, (c, s, bg)) in enumerate(zip(ds.images, base.images, ds.captions, recoloured,
                                                                  base.labels)):
        if not new:  # the shapes image itself
            np.testing.assert_array_equal(img, ref)
            assert caption == data.caption_for(c, s, bg)
            continue
        m = re.fullmatch(r"a #([0-9a-f]{6}) (\w+) on a (\w+) background", caption)
        assert m and (m[2], m[3]) == (data.SHAPES[s], data.BACKGROUND_NAMES[bg]), caption
        rgb = np.array([int(m[1][i:i + 2], 16) for i in (0, 2, 4)])
        g = data.shape_geometry(2, i, 32)
        inside = data.render_silhouette(s, g.center, g.radius, 32) == 255  # fully covered pixels
        assert np.abs(img[inside].astype(int) - rgb).max() <= 1  # the caption's colour (anti-aliasing aside)
        background = (img == ref).all(-1) & ~inside
        assert background.mean() > 0.3  # the rest is the shapes image's background, unchanged
    train, held = data.train_and_eval("shapes-anycolor", 20, 10, 32, seed=2)
    np.testing.assert_array_equal(train.images, ds.images[:20])
    assert not {im.tobytes() for im in train.images} & {im.tobytes() for im in held.images}
    np.testing.assert_array_equal(data.load_dataset("shapes-anycolor", 3, 32, seed=2).images, ds.images[:3])


def test_concept_datasets_replace_one_attribute_of_the_shapes_images():
    """LoRA concepts: image i of concept_dataset is shapes image i with its colour ("orange") or shape ("star")
    replaced; everything else (the other labels, position, size) is the same."""
    base = data.shapes_dataset(30, seed=2)
    orange = data.concept_dataset("orange", 30, seed=2)
    star = data.concept_dataset("star", 30, seed=2)
    i_orange, i_star = data.ALL_COLOR_NAMES.index("orange"), data.ALL_SHAPES.index("star")
    assert (orange.labels[:, 0] == i_orange).all() and (orange.labels[:, 1:] == base.labels[:, 1:]).all()
    assert (star.labels[:, 1] == i_star).all() and (star.labels[:, [0, 2]] == base.labels[:, [0, 2]]).all()
    assert orange.captions[0] == f"an orange {data.SHAPES[base.labels[0, 1]]} on a " \
                                 f"{data.BACKGROUND_NAMES[base.labels[0, 2]]} background"
    assert star.captions[0].startswith(f"a {data.COLOR_NAMES[base.labels[0, 0]]} star on a ")
    # the shape's pixels: orange where the base image had its colour, background pixels unchanged
    fg = np.array(data.COLORS[data.COLOR_NAMES[base.labels[0, 0]]]) * 255
    inside = np.abs(base.images[0].astype(float) - fg).max(-1) < 1
    assert inside.sum() > 20
    np.testing.assert_allclose(orange.images[0][inside], [[255, 128, 0]] * int(inside.sum()), atol=1)
    outside = np.abs(base.images[0].astype(float) - base.images[0][0, 0]).max(-1) < 1  # pure background
    assert outside.sum() > 200
    np.testing.assert_array_equal(orange.images[0][outside], base.images[0][outside])
    with pytest.raises(data.DataError, match=r"unknown concept 'purple' \(shapes: .*colours: .*orange"):
        data.concept_dataset("purple", 2)


def test_image_folder_dataset(tmp_path):
    from PIL import Image

    with pytest.raises(data.DataError, match="no images"):
        data.image_folder_dataset(tmp_path)
    for i, color in enumerate(["red", "blue"]):
        Image.new("RGB", (48, 40), color).save(tmp_path / f"img{i}.png")
    (tmp_path / "img0.txt").write_text("a red picture\n")
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg at all")
    ds = data.image_folder_dataset(tmp_path, image_size=32)
    assert len(ds) == 2 and ds.skipped == 1
    assert ds.images.shape == (2, 32, 32, 3)
    assert ds.captions == ["a red picture", ""]
    assert tuple(ds.images[0, 5, 5]) == (255, 0, 0)
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "x.png").write_bytes(b"\x89PNG truncated")
    with pytest.raises(data.DataError, match="could be read"):
        data.image_folder_dataset(only_bad)
    with pytest.raises(data.DataError, match="unknown dataset"):
        data.load_dataset("imagenet", 10, 32)


def test_hf_dataset_through_datasets_load_dataset(tmp_path, monkeypatch):
    """The 'hf:' path runs datasets.load_dataset for real, on a local folder (no network): images + metadata."""
    pytest.importorskip("datasets")
    import json

    from PIL import Image

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "ds"
    root.mkdir()
    rows = [("a.png", "red", "a red square"), ("b.png", "blue", "a blue circle"), ("c.png", "lime", "a green one")]
    for name, color, _ in rows:
        Image.new("RGB", (40, 40), color).save(root / name)
    (root / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f, "text": t}) + "\n" for f, _, t in rows))
    ds = data.load_dataset(f"hf:{root}", 2, 32)
    assert ds.images.shape == (2, 32, 32, 3) and ds.images.dtype == np.uint8
    assert sorted(ds.captions) == ["a blue circle", "a red square"]
    train, held = data.train_and_eval(f"hf:{root}", 2, 1, 32, seed=0)
    assert len(train) == 2 and len(held) == 1
    with pytest.raises(data.DataError, match="no column 'caption'"):
        data.hf_dataset(str(root), 32, caption_column="caption")
    with pytest.raises(data.DataError, match="cannot load split"):
        data.hf_dataset(str(tmp_path / "missing"), 32)


def test_tokenizer_is_clip_format(tmp_path):
    from transformers import CLIPTokenizer

    from sdjax.train.tokenizer import build_clip_tokenizer

    captions = [c for _, c in data.all_shape_captions()]
    build_clip_tokenizer(captions, tmp_path, model_max_length=16)
    assert {"vocab.json", "merges.txt"} <= {p.name for p in tmp_path.iterdir()}
    tok = CLIPTokenizer.from_pretrained(tmp_path)
    assert tok.model_max_length == 16
    ids = tok("a magenta triangle on a gray background", padding="max_length", max_length=16).input_ids
    tokens = tok.convert_ids_to_tokens(ids)
    assert tokens[:9] == ["<|startoftext|>", "a</w>", "magenta</w>", "triangle</w>", "on</w>", "a</w>", "gray</w>",
                          "background</w>", "<|endoftext|>"]
    assert tok.pad_token == "<|endoftext|>"
    # unseen words still encode (byte-level fallback), no unknown tokens
    assert tok.unk_token_id not in tok("a purple hexagon").input_ids[1:-1]


# ---------------------------------------------------------------------- config
def test_random_crops_are_a_function_of_seed_and_step_on_the_latent_grid():
    images = np.arange(5 * 8 * 8 * 3, dtype=np.int32).reshape(5, 8, 8, 3)
    a = autoencoder.random_crops(images, 4, 2, seed=0, step=3)
    assert a.shape == (5, 4, 4, 3)
    np.testing.assert_array_equal(a, autoencoder.random_crops(images, 4, 2, seed=0, step=3))  # resumable
    assert not np.array_equal(a, autoencoder.random_crops(images, 4, 2, seed=0, step=4))
    for crop, image in zip(a, images):  # each crop is a window of its own image, at even offsets
        y, x = np.argwhere(image[..., 0] == crop[0, 0, 0])[0]
        assert y % 2 == 0 and x % 2 == 0
        np.testing.assert_array_equal(crop, image[y:y + 4, x:x + 4])
    assert autoencoder.random_crops(images, None, 2, 0, 0) is images
    with pytest.raises(ConfigError, match="'crop_size' = 33: must be at most image_size"):
        load_config(autoencoder.Config, "shapes_upscaler_autoencoder", ["crop_size=33"])
    with pytest.raises(ConfigError, match="'crop_size' = 16: crops need a fully convolutional"):
        load_config(autoencoder.Config, "shapes_autoencoder", ["crop_size=16"])


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="'num_stepz'.*did you mean 'num_steps'"):
        load_config(autoencoder.Config, ROOT / "configs" / "shapes_autoencoder.py", ["num_stepz=3"])
    with pytest.raises(ConfigError, match="'num_stepz'.*did you mean 'num_steps'"):
        load_config(autoencoder.Config, "shapes_autoencoder", ["num_stepz=3"])  # by name, as installed
    cfg_file = tmp_path / "cfg.py"
    cfg_file.write_text("def get_config():\n    return dict(batch_size=4, colour='red')\n")
    with pytest.raises(ConfigError, match="unknown config key.*'colour'"):
        load_config(ldm.Config, cfg_file)
    # the shipped configs are valid
    load_config(autoencoder.Config, ROOT / "configs" / "shapes_autoencoder.py")
    # --set values: Python literals, or JSON (true / false / null), or else a bare string
    cfg = load_config(autoencoder.Config, "shapes_upscaler_autoencoder",
                      ['vae={"block_out_channels": [8, 16], "mid_block_add_attention": false}', "disc_start=null",
                       "dataset=folder:/tmp/x"])
    assert cfg.vae["mid_block_add_attention"] is False and cfg.vae["block_out_channels"] == [8, 16]
    assert cfg.disc_start is None and cfg.dataset == "folder:/tmp/x"
    with pytest.raises(ConfigError, match="'kl_weight' = nan .*expected number, got non-finite number"):
        load_config(autoencoder.Config, "shapes_upscaler_autoencoder", ["kl_weight=NaN"])  # JSON's NaN
    # --set repeats and takes several KEY=VALUE each: all of them reach the config
    from sdjax.cli import build_parser

    args = build_parser().parse_args(["train", "autoencoder", "--workdir", "w", "--set", "crop_size=16",
                                      "num_steps=7", "--set", "vae.latent_channels=2", "--set", "dataset=folder:x"])
    cfg = load_config(autoencoder.Config, "shapes_upscaler_autoencoder", args.set)
    assert (cfg.crop_size, cfg.num_steps, cfg.vae["latent_channels"], cfg.dataset) == (16, 7, 2, "folder:x")
    assert cfg.vae["block_out_channels"] == load_config(autoencoder.Config, "shapes_upscaler_autoencoder").vae[
        "block_out_channels"]  # a dotted key changes that key only
    load_config(ldm.Config, ROOT / "configs" / "shapes_ldm.py")


@pytest.mark.slow
def test_resume_with_changed_config_is_refused(trained_ae):
    workdir, cfg, _ = trained_ae
    changed = tiny_config(autoencoder.Config, "shapes_autoencoder", TINY_AE | {"kl_weight": 1e-3})
    with pytest.raises(ConfigError, match=r"kl_weight: 1e-06 -> 0.001"):
        autoencoder.train_and_evaluate(changed, workdir, progress=False)


def test_config_of_a_run_without_checkpoint_is_replaced(tmp_path):
    from sdjax.train.checkpointing import check_or_write_config

    a, b = {"num_steps": 10, "dataset": "folder:/typo"}, {"num_steps": 10, "dataset": "shapes"}
    check_or_write_config(tmp_path, a, resumable=False)
    check_or_write_config(tmp_path, b, resumable=False)  # nothing to resume: the fixed config replaces it
    assert json.loads((tmp_path / "config.json").read_text()) == b
    check_or_write_config(tmp_path, b, resumable=True)
    with pytest.raises(ConfigError, match=r"different config.*dataset: 'shapes' -> 'folder:/typo'"):
        check_or_write_config(tmp_path, a, resumable=True)


def run_sdjax(*args):
    env = dict(os.environ, XLA_FLAGS="")
    return subprocess.run([sys.executable, "-m", "sdjax.cli", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, env=env, timeout=300)


@pytest.mark.slow
def test_command_line_errors_are_one_line(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (("train", "autoencoder", "--config", "configs/nope.py", "--workdir", tmp_path / "w1"),
         "sdjax train autoencoder: error: config file not found: configs/nope.py"),
        (("train", "ldm", "--config", "configs/shapes_ldm.py", "--workdir", tmp_path / "w2", "--set", "num_stepz=3"),
         "sdjax train ldm: error: unknown config key(s) in configs/shapes_ldm.py: 'num_stepz'"),
        (("train", "autoencoder", "--config", "configs/shapes_autoencoder.py", "--workdir", tmp_path / "w3",
          "--set", f"dataset=folder:{empty}"), "sdjax train autoencoder: error: no images"),
        (("train", "export", "--workdir", tmp_path / "nowhere", "--out", tmp_path / "p"),
         f"sdjax train export: error: {tmp_path / 'nowhere'} is not a stage-2 workdir"),
    ]
    for args, message in cases:
        r = run_sdjax(*args)
        assert r.returncode == 2, (args, r.stderr[-2000:])
        assert message in r.stderr and "Traceback" not in r.stderr, (args, r.stderr[-2000:])
    assert not (tmp_path / "p").exists()


# ---------------------------------------------------------------------- stage 1
@pytest.mark.slow
def test_autoencoder_trains_and_sets_scaling_factor(trained_ae):
    workdir, cfg, summary = trained_ae
    rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, cfg.num_steps + 1))
    assert np.mean([r["l1"] for r in rows[-3:]]) < 0.8 * np.mean([r["l1"] for r in rows[:3]])
    vae_cfg = json.loads((workdir / "vae" / "config.json").read_text())
    assert vae_cfg["scaling_factor"] == pytest.approx(1 / summary["latent_std"])
    assert summary["f"] == 2 and np.isfinite(summary["psnr_db"])
    assert summary["step_compiles_this_run"] == 1, "the train step compiles once"
    assert (workdir / "loss.png").stat().st_size > 0
    # the patch discriminator is on from disc_start
    assert all(np.isfinite(r["d_loss"]) for r in rows)
    assert all(r["loss"] == pytest.approx(r["l1"] + 1e-6 * r["kl"], rel=1e-5) for r in rows[:cfg.disc_start])
    assert any(r["loss"] != pytest.approx(r["l1"] + 1e-6 * r["kl"], rel=1e-5) for r in rows[cfg.disc_start:])


@pytest.mark.slow
def test_autoencoder_resumes_after_kill_9(tmp_path, trained_ae):
    """A real kill -9 of `sdjax train autoencoder`; the same command goes on from the last checkpoint and
    reaches the same parameters as an uninterrupted run."""
    overrides = {**TINY_AE, "num_steps": 100000, "checkpoint_every": 3, "disc_start": None}
    cfg = tiny_config(autoencoder.Config, "shapes_autoencoder", overrides)
    killed = tmp_path / "killed"
    args = [sys.executable, "-m", "sdjax.cli", "train", "autoencoder", "--workdir", str(killed), "--set"]
    args += [f"{k}={v!r}" for k, v in overrides.items()]
    proc = subprocess.Popen(args, cwd=ROOT, env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpts = killed / "checkpoints"
    deadline = time.time() + 90
    while time.time() < deadline and proc.poll() is None:
        steps = [int(p.name) for p in ckpts.glob("*") if p.name.isdigit()] if ckpts.is_dir() else []
        if steps and max(steps) >= 6:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    latest = Checkpointer(killed, 3, 2).latest_step()
    assert latest is not None and latest >= 6 and latest % 3 == 0
    target = latest + 5
    autoencoder.train_and_evaluate(cfg, killed, until_step=target, progress=False)  # the same run, resumed
    straight = tmp_path / "straight"
    autoencoder.train_and_evaluate(cfg, straight, until_step=target, progress=False)
    vae = autoencoder.make_vae(cfg)
    a = restore(autoencoder, cfg, killed, target, vae)
    b = restore(autoencoder, cfg, straight, target, vae)
    assert int(a["step"]) == target
    assert tree_equal(a["params"], b["params"]) and tree_equal(a["opt_state"], b["opt_state"])
    # the metrics log reads as one run: no step twice
    steps = [json.loads(l)["step"] for l in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, target + 1))


# ---------------------------------------------------------------------- stage 2 + export
@pytest.fixture(scope="module")
def trained_ldm(trained_ae, tmp_path_factory):
    ae_dir = trained_ae[0]
    workdir = tmp_path_factory.mktemp("ldm")
    cfg = tiny_config(ldm.Config, "shapes_ldm", TINY_LDM | {"autoencoder_dir": str(ae_dir)})
    summary = ldm.train_and_evaluate(cfg, workdir, progress=False)
    return workdir, cfg, summary


@pytest.mark.slow
def test_ldm_loss_decreases(trained_ldm):
    workdir, cfg, summary = trained_ldm
    assert summary["step_compiles_this_run"] == 1
    assert jax.device_count() == 8  # conftest: the steps ran data-parallel over 8 host devices
    losses = [json.loads(l)["loss"] for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == cfg.num_steps
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])


@pytest.mark.slow
def test_ldm_resume_gives_the_same_parameters(trained_ldm, tmp_path):
    straight, cfg, _ = trained_ldm  # the uninterrupted run
    # interrupted after step 13 without saving (as kill -9 does): checkpoint 10 is the newest
    ldm.train_and_evaluate(cfg, tmp_path, until_step=13, final_save=False, progress=False, export=False)
    assert Checkpointer(tmp_path, 10, 3).latest_step() == 10
    resumed = ldm.train_and_evaluate(cfg, tmp_path, progress=False, export=False)  # the same command again
    assert resumed["step_compiles_this_run"] == 0, "same setup in the same process: JAX's cache, no compile"
    vae, _ = ldm.load_autoencoder(cfg.autoencoder_dir)
    models = ldm.make_models(cfg, vae, ldm.setup_tokenizer(tmp_path, [], cfg.model_max_length))
    a = restore(ldm, cfg, tmp_path, cfg.num_steps, *models)
    b = restore(ldm, cfg, straight, cfg.num_steps, *models)
    assert tree_equal(a["params"], b["params"]) and tree_equal(a["ema"], b["ema"])
    assert tree_equal(a["opt_state"], b["opt_state"])
    assert not tree_equal(a["params"], a["ema"])


@pytest.mark.parity
@pytest.mark.slow
def test_export_loads_in_sdjax_and_diffusers(trained_ldm):
    import torch
    from diffusers import StableDiffusionPipeline

    from sdjax.pipelines import FlaxStableDiffusionPipeline

    folder = trained_ldm[0] / "pipeline"
    assert {p.name for p in folder.iterdir()} >= {"model_index.json", "unet", "vae", "text_encoder", "tokenizer",
                                                   "scheduler"}
    prompt = "a red circle on a white background"
    pipe, params = FlaxStableDiffusionPipeline.from_pretrained(folder)
    latents = np.asarray(jax.random.normal(jax.random.PRNGKey(0), pipe.latent_shape(1, 32, 32)))
    ours = pipe(pipe.prepare_inputs([prompt]), params, jax.random.PRNGKey(0), num_inference_steps=3,
                guidance_scale=4.0, latents=latents, jit=False).images
    tpipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    assert type(tpipe.scheduler).__name__ == "DDIMScheduler"
    theirs = tpipe([prompt], num_inference_steps=3, guidance_scale=4.0, latents=torch.from_numpy(latents),
                   output_type="np").images
    assert ours.shape == theirs.shape == (1, 32, 32, 3)
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=2e-3)


@pytest.mark.slow
def test_export_command_writes_the_ema_weights(trained_ldm, tmp_path):
    from sdjax.train.ldm import export_from_workdir

    from sdjax.models.unet_2d_condition import UNet2DConditionModel

    workdir = trained_ldm[0]
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "stale.txt").write_text("from an earlier export")
    out = export_from_workdir(workdir, tmp_path / "p", overwrite=True)
    _, p1 = UNet2DConditionModel.from_pretrained(out, subfolder="unet")
    _, p2 = UNet2DConditionModel.from_pretrained(workdir / "pipeline", subfolder="unet")
    assert tree_equal(p1, p2)
    # the folder was replaced as a whole, and nothing of the swap is left beside it
    assert not (out / "stale.txt").exists() and os.listdir(tmp_path) == ["p"]
