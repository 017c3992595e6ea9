"""LoRA training (train/lora.py) on the shipped toy model: a few steps, the file diffusers loads, resume."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from sdjax.errors import ConfigError
from sdjax.testing import rel_err

SHORT = ["num_steps=6", "batch_size=8", "num_concept_images=32", "num_prior_images=32", "log_every=2",
         "checkpoint_every=3", "learning_rate=0.01", "warmup_steps=1"]


def config(*overrides):
    from sdjax.train import lora
    from sdjax.train.config import load_config

    return load_config(lora.Config, "shapes_lora", list(SHORT) + list(overrides))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from sdjax.train import lora

    workdir = tmp_path_factory.mktemp("lora")
    summary = lora.train_and_evaluate(config(), workdir, progress=False, evaluate=False)
    return workdir, summary


def test_config_errors():
    with pytest.raises(ConfigError, match="concept"):
        config("concept=circle")
    with pytest.raises(ConfigError, match="both empty"):
        config("unet_targets=[]")
    from sdjax.train import lora

    with pytest.raises(ConfigError, match=r"no unet layer is named \['to_x'\]"):
        lora.init_lora(config("unet_targets=['to_q', 'to_x']"), lora.load_base(config())[2], jax.random.PRNGKey(0))


def test_evaluation_classifier_extends_to_the_concept(tmp_path):
    """The evaluation's classifier gets one more colour class for "orange", one more shape class for "star"."""
    from sdjax.train import data
    from sdjax.train import evaluate as ev

    assert ev.class_counts() == (3, 6)
    assert ev.class_counts(("orange",)) == (3, 7) and ev.class_counts(("star",)) == (4, 6)
    assert data.ALL_COLOR_NAMES[6] == "orange" and data.ALL_SHAPES[3] == "star"
    params = ev.ShapesClassifier(*ev.class_counts(("orange",))).init(jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3)))
    feats, logits = ev.ShapesClassifier(3, 7).apply(params, np.zeros((2, 32, 32, 3)))
    assert {k: v.shape for k, v in logits.items()} == {"color": (2, 7), "shape": (2, 3), "background": (2, 3)}
    assert (ev.num_colors_of(params["params"]), ev.num_shapes_of(params["params"])) == (7, 3)
    with pytest.raises(data.DataError, match=r"extra \['circle'\]: not new concepts .*star, orange"):
        ev.load_or_train_classifier(tmp_path, extra=("circle",))


@pytest.mark.slow
def test_lora_trains_and_loads_in_sdjax(trained):
    workdir, summary = trained
    from sdjax.assets import toy_model_path
    from sdjax.pipelines import FlaxStableDiffusionPipeline

    assert summary["steps"] == 6 and summary["step_compiles_this_run"] == 1
    assert (workdir / "lora" / "pytorch_lora_weights.safetensors").is_file()
    pipe, params = FlaxStableDiffusionPipeline.from_pretrained(toy_model_path())
    loaded = pipe.load_lora_weights(workdir / "lora", params, adapter_name="star")
    adapter = loaded["lora"]["star"]
    assert adapter.components == ("unet",) and {layer.rank for layer in adapter.layers["unet"].values()} == {8}
    assert max(float(np.abs(layer.up).max()) for layer in adapter.layers["unet"].values()) > 0  # it trained


@pytest.mark.slow
@pytest.mark.parity
def test_trained_lora_loads_in_diffusers(trained):
    """diffusers' load_lora_weights reads the trained file and its UNet output equals sdjax's with the LoRA merged."""
    pytest.importorskip("peft", reason="diffusers loads LoRAs through PEFT: pip install peft")
    import torch
    from diffusers import StableDiffusionPipeline

    from sdjax.assets import toy_model_path
    from sdjax.lora import merge_lora
    from sdjax.pipelines import FlaxStableDiffusionPipeline

    workdir, _ = trained
    ref = StableDiffusionPipeline.from_pretrained(toy_model_path(), safety_checker=None, requires_safety_checker=False)
    ref.load_lora_weights(str(workdir / "lora"), adapter_name="star")
    pipe, params = FlaxStableDiffusionPipeline.from_pretrained(toy_model_path())
    with_lora = pipe.load_lora_weights(workdir / "lora", params, adapter_name="star")
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    context = rng.standard_normal((2, 16, 64)).astype(np.float32)
    t = np.array([10, 700])
    errs = []
    for scale in (0.0, 1.0):
        ref.set_adapters(["star"], [scale])
        with torch.no_grad():
            want = ref.unet(torch.from_numpy(sample), torch.from_numpy(t), torch.from_numpy(context)).sample.numpy()
        merged = merge_lora(params, with_lora["lora"], {"star": scale})
        got = pipe.unet.apply({"params": merged["unet"]}, sample, t, context)
        errs.append(rel_err(got.sample if hasattr(got, "sample") else got, want))
    print(f"\n[trained LoRA in diffusers vs sdjax, UNet] rel err at scales 0, 1: {errs[0]:.1e}, {errs[1]:.1e}")
    assert max(errs) <= 1e-5


@pytest.mark.slow
def test_lora_resume_gives_the_same_adapter(trained, tmp_path):
    from safetensors.numpy import load_file

    from sdjax.train import lora

    workdir, _ = trained
    lora.train_and_evaluate(config(), tmp_path, until_step=3, progress=False, evaluate=False)
    lora.train_and_evaluate(config(), tmp_path, progress=False, evaluate=False)
    a = load_file(workdir / "lora" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "lora" / "pytorch_lora_weights.safetensors")
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-6, err_msg=k)
