"""The careless user of the training commands and their Python API: bad configs (nested model dicts included),
workdirs that are files or someone else's folders, exports over the workdir: one line naming the key or
folder, exit 2, nothing of theirs touched."""

from __future__ import annotations

import pytest

from sdjax.errors import ConfigError
from sdjax.train import autoencoder, ldm
from sdjax.train.config import load_config

from .badinput import run_cli


@pytest.fixture()
def home(tmp_path):
    (tmp_path / "notes.txt").write_text("my notes")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "photo.png").write_bytes(b"not really a png")
    return tmp_path


def test_train_arguments(capsys, home):
    wd = home / "wd"
    base = ["train", "ldm", "--workdir", wd]
    run_cli(capsys, ["train", "ldm", "--workdir", home / "notes.txt"], home, "notes.txt is a file, not a folder")
    run_cli(capsys, ["train", "ldm", "--workdir", home / "mine"], home, "mine is not empty")
    run_cli(capsys, base + ["--config", "nope"], home, "config file not found: nope (shipped configs:")
    run_cli(capsys, base + ["--set", "num_steps=-1"], home, "'num_steps' = -1: must be >= 1")
    run_cli(capsys, base + ["--set", "batch_size=0"], home, "'batch_size' = 0: must be >= 1")
    run_cli(capsys, base + ["--set", "learning_rate='fast'"], home, "'learning_rate' = 'fast'")
    run_cli(capsys, base + ["--set", "unet.layers_per_blok=2"], home, "did you mean 'layers_per_block'")
    run_cli(capsys, base + ["--set", "unet.block_out_channels=None"], home, "'block_out_channels' = None")
    run_cli(capsys, base + ["--set", "unet=[1, 2]"], home, "'unet' = [1, 2]")
    # every --set applies (the last one alone did: this started a run with batch_size 32), each key once
    run_cli(capsys, base + ["--set", "batch_size=0", "--set", "num_steps=10"], home, "'batch_size' = 0: must be >= 1")
    run_cli(capsys, base + ["--set", "num_steps=10", "--set", "num_steps=20"], home,
            "override 'num_steps=20': 'num_steps' is already set by another override; set each key once")
    run_cli(capsys, base + ["--set", "unet.layers_per_block=2", "unet={'layers_per_block': 1}"], home,
            "'unet' is already set by another override")
    run_cli(capsys, base + ["--until-step", "0"], home, "argument --until-step")
    run_cli(capsys, ["train", "autoencoder", "--workdir", wd, "--set", "vae.latent_channels=0"], home,
            "'latent_channels' = 0 in config key 'vae': must be > 0")
    assert not wd.exists()


def test_export_never_replaces_the_workdir_or_foreign_folders(capsys, home):
    wd = home / "wd"
    (wd / "checkpoints").mkdir(parents=True)
    (wd / "config.json").write_text("{}")
    for out in (wd, home):  # the workdir, or a folder holding it: never, even with --overwrite
        run_cli(capsys, ["train", "export", "--workdir", wd, "--out", out, "--overwrite"], home, "")
    run_cli(capsys, ["train", "export", "--workdir", wd, "--out", home / "mine"], home, "is not an sdjax output")
    run_cli(capsys, ["train", "evaluate", "--out", home / "notes.txt"], home, "is a file, not a folder")



@pytest.mark.parametrize("schema,name,override,match", [
    (ldm.Config, "shapes_ldm", {"text_encoder": {"hidden_act": 3}}, "'hidden_act' = 3 in config key 'text_encoder'"),
    (ldm.Config, "shapes_ldm", {"text_encoder": {"vocab_size": 10}}, "'vocab_size' is filled in"),
    (ldm.Config, "shapes_ldm", {"caption_dropout": 1.0}, "'caption_dropout' = 1.0: must be in \\[0, 1\\)"),
    (ldm.Config, "shapes_ldm", {"beta_start": 0.5, "beta_end": 0.1}, "need 0 < beta_start < beta_end < 1"),
    (ldm.Config, "shapes_ldm", {"num_train_images": 3}, "fewer than one batch"),
    (ldm.Config, "shapes_ldm", {"export_dir": 5}, "'export_dir' = 5"),
    (autoencoder.Config, "shapes_autoencoder", {"vae": {"block_out_channels": [16, "32"]}}, "'block_out_channels'"),
    (autoencoder.Config, "shapes_autoencoder", {"disc_start": -5}, "'disc_start' = -5: must be >= 0"),
    (autoencoder.Config, "shapes_autoencoder", {"kl_weight": "1e-6"}, "'kl_weight' = '1e-6'"),
])
def test_config_values(schema, name, override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(schema, name, override)
