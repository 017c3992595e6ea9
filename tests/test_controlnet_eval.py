"""The silhouette ControlNet's evaluation (train/evaluate.py: evaluate_controlnet, `sdjax train evaluate
--controlnet`): held-out silhouettes covering every caption, the shape mask and its IoU, and a small run of the
toy model with the shipped toy ControlNet through the command line."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization

from sdjax.cli import main
from sdjax.train import data
from sdjax.train import evaluate as ev


def test_held_out_silhouettes_cover_every_caption():
    real, silhouettes, labels = ev.held_out_silhouettes(2)
    combos = [combo for combo, _ in data.all_shape_captions()]
    assert real.shape == (108, 32, 32, 3) and silhouettes.shape == (108, 32, 32)
    assert [tuple(x) for x in labels] == combos * 2  # caption k's j-th image at j * 54 + k
    assert len({im.tobytes() for im in real}) == 108  # 108 different images
    # not the toy ControlNet's training images (data seed 0, indices 0 ..), nor the LDM's
    train = data.shapes_dataset(200, seed=0)
    assert not {im.tobytes() for im in real} & {im.tobytes() for im in train.images}
    # each silhouette is its image's shape: the real image's mask matches it
    iou = ev.mask_iou(ev.shape_masks(real, labels), silhouettes)
    assert np.median(iou) > 0.95 and iou.min() > 0.75, iou  # anti-aliased edges of the smallest shapes lower it


def test_mask_iou():
    real, silhouettes, labels = ev.held_out_silhouettes(1)
    background = np.array([np.array(data.BACKGROUNDS[data.BACKGROUND_NAMES[b]]) * 255 for b in labels[:, 2]])
    empty = np.broadcast_to(background[:, None, None], real.shape).astype(np.uint8)
    assert ev.mask_iou(ev.shape_masks(empty, labels), silhouettes).max() == 0.0
    # the right shape in the wrong place: the silhouettes of the next caption's image
    moved = ev.mask_iou(ev.shape_masks(real, labels), np.roll(silhouettes, 1, axis=0))
    assert np.median(moved) < 0.5
    # a half-covered silhouette pixel counts inside (>= 128), an image's pixel when nearer the caption's color
    sil = np.zeros((1, 4, 4), np.uint8)
    sil[0, :2] = 128
    image = np.zeros((1, 4, 4, 3), np.uint8)  # black background, red shape (caption: red circle on black)
    image[0, :1] = (255, 0, 0)
    image[0, 1, 0] = (140, 0, 0)  # nearer red than black
    iou = ev.mask_iou(ev.shape_masks(image, np.array([[0, 0, 1]])), sil)
    assert iou[0] == pytest.approx(5 / 8)


def test_vae_reconstructions_come_back_through_the_toy_autoencoder():
    """The ceiling row's reconstructions: close to the input through the shipped toy VAE (24 dB on these), not
    through an untrained one of the same config."""
    from sdjax.assets import toy_model_path
    from sdjax.models.autoencoder_kl import AutoencoderKL

    real = ev.held_out_silhouettes(1)[0][:16]
    vae, params = AutoencoderKL.from_pretrained(toy_model_path() / "vae")
    recon = ev.vae_reconstructions(vae, params, real)
    assert recon.shape == real.shape and recon.dtype == np.uint8

    def psnr(x):
        return 10 * np.log10(255.0 ** 2 / np.mean((x.astype(np.float64) - real) ** 2))

    untrained = ev.vae_reconstructions(vae, vae.init_weights(jax.random.PRNGKey(0)), real)
    assert psnr(recon) > 20 and psnr(untrained) < 12, (psnr(recon), psnr(untrained))


@pytest.mark.slow
def test_evaluate_controlnet_from_the_command_line(tmp_path, capsys):
    """A small run (54 captions once, 4 steps) of the toy model with and without the shipped toy ControlNet. The
    evaluation classifier here is an untrained one (cached where the run looks for it), so its adherence numbers
    are only checked to be rates; the IoU needs no classifier."""
    clf_dir = tmp_path / "classifier"
    clf_dir.mkdir()
    params = ev.ShapesClassifier().init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))["params"]
    (clf_dir / "classifier_32.msgpack").write_bytes(serialization.to_bytes(params))
    out = tmp_path / "eval"
    assert main(["train", "evaluate", "--controlnet", "--steps", "4", "--per-caption", "1",
                 "--classifier-dir", str(clf_dir), "--out", str(out)]) == 0
    result = json.loads((out / "eval_controlnet.json").read_text())
    assert json.loads(capsys.readouterr().out) == result  # what it prints is what it wrote
    assert result["images"] == 54 and result["steps"] == 4 and result["data_seed"] == ev.CONTROLNET_DATA_SEED
    assert (out / "controlnet_samples.png").is_file()
    rows = result["rows"]
    assert set(rows) == {"without", "with"}
    assert rows["without"]["controlnet_conditioning_scale"] == 0.0
    assert rows["with"]["controlnet_conditioning_scale"] == 1.0
    for row in rows.values():
        assert 0.0 <= row["median_iou"] <= 1.0
        assert set(row["median_iou_per_shape"]) == set(data.SHAPES)
        assert set(row["adherence"]) == {"color", "shape", "background"}
        assert all(0.0 <= v <= 1.0 for v in row["adherence"].values())
        assert np.isfinite(row["fd_vs_real"])
    ceiling = result["vae_reconstruction"]  # real images through the VAE: no diffusion, so close to the silhouettes
    assert ceiling["median_iou"] > 0.85 and set(ceiling["median_iou_per_shape"]) == set(data.SHAPES)
    # the ControlNet puts the shape where the silhouette is, even in 4 steps
    assert rows["with"]["median_iou"] > rows["without"]["median_iou"] + 0.2, rows
