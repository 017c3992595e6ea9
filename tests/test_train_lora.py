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
    loaded = pipe.load_lora_weights(workdir / "lora", params, adapter_name="orange")
    adapter = loaded["lora"]["orange"]
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
    ref.load_lora_weights(str(workdir / "lora"), adapter_name="orange")
    pipe, params = FlaxStableDiffusionPipeline.from_pretrained(toy_model_path())
    with_lora = pipe.load_lora_weights(workdir / "lora", params, adapter_name="orange")
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    context = rng.standard_normal((2, 16, 64)).astype(np.float32)
    t = np.array([10, 700])
    errs = []
    for scale in (0.0, 1.0):
        ref.set_adapters(["orange"], [scale])
        with torch.no_grad():
            want = ref.unet(torch.from_numpy(sample), torch.from_numpy(t), torch.from_numpy(context)).sample.numpy()
        merged = merge_lora(params, with_lora["lora"], {"orange": scale})
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
    a, b = (load_file(w / "lora" / "learned_embeds.safetensors") for w in (workdir, tmp_path))  # the new token's row
    np.testing.assert_allclose(a["orange"], b["orange"], atol=1e-6)


@pytest.mark.slow
def test_lora_without_a_new_token(tmp_path):
    """token_init=[]: the LoRA alone, the concept word as the base tokenizer's pieces; no embedding file."""
    from sdjax.train import lora

    summary = lora.train_and_evaluate(config("token_init=[]"), tmp_path, progress=False, evaluate=False)
    assert summary["steps"] == 6 and "embedding" not in summary
    assert sorted(p.name for p in (tmp_path / "lora").iterdir()) == ["pytorch_lora_weights.safetensors"]


def test_token_init_words_must_be_single_tokens():
    from sdjax.train import lora

    with pytest.raises(ConfigError, match="token_init"):
        config("token_init=['']")
    cfg = config("token_init=['red', 'purplish']")
    _, pipe, params = lora.load_base(cfg)
    with pytest.raises(ConfigError, match=r"'purplish' is \d+ tokens"):
        lora.add_concept_token(cfg, pipe, params)


def test_bad_token_init_writes_nothing(tmp_path):
    from sdjax.train import lora

    with pytest.raises(ConfigError, match="'purplish'"):
        lora.train_and_evaluate(config("token_init=['purplish']"), tmp_path / "run", progress=False, evaluate=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.parity
def test_pivotal_token_trains_and_loads_in_sdjax_and_diffusers(trained):
    """token_init (the shipped config's): "orange" becomes one new token trained with the LoRA;
    learned_embeds.safetensors beside the LoRA loads in diffusers (load_textual_inversion + load_lora_weights) and in
    sdjax, with the same text embeddings and UNet output."""
    pytest.importorskip("peft", reason="diffusers loads LoRAs through PEFT: pip install peft")
    import torch
    from diffusers import StableDiffusionPipeline
    from safetensors.numpy import load_file

    from sdjax.assets import toy_model_path
    from sdjax.lora import merge_lora
    from sdjax.pipelines import FlaxStableDiffusionPipeline
    tmp_path, summary = trained
    assert config().token_init == ["red", "yellow"]
    emb = load_file(tmp_path / "lora" / "learned_embeds.safetensors")
    assert list(emb) == ["orange"] and emb["orange"].shape == (1, 64)
    pipe, params = FlaxStableDiffusionPipeline.from_pretrained(toy_model_path())
    table = np.asarray(params["text_encoder"]["embeddings"]["token_embedding"]["embedding"])
    red, yellow = (pipe.tokenizer(w, add_special_tokens=False).input_ids[0] for w in ("red", "yellow"))
    assert not np.allclose(emb["orange"][0], (table[red] + table[yellow]) / 2), "the embedding trained"
    assert summary["embedding"].endswith("learned_embeds.safetensors")

    tpipe, tparams = pipe.load_textual_inversion(tmp_path / "lora", params, token="orange")
    tparams = tpipe.load_lora_weights(tmp_path / "lora", tparams, adapter_name="orange")
    ids = tpipe.prepare_inputs(["an orange circle on a white background"])
    assert len(tpipe.tokenizer("an orange circle").input_ids) == 5  # <bos> an orange circle <eos>

    ref = StableDiffusionPipeline.from_pretrained(toy_model_path(), safety_checker=None, requires_safety_checker=False)
    ref.load_textual_inversion(str(tmp_path / "lora"), token="orange")
    ref.load_lora_weights(str(tmp_path / "lora"), adapter_name="orange")
    ref_ids = ref.tokenizer(["an orange circle on a white background"], padding="max_length",
                            max_length=ref.tokenizer.model_max_length, return_tensors="pt").input_ids
    np.testing.assert_array_equal(ref_ids.numpy(), ids)
    with torch.no_grad():
        want_ctx = ref.text_encoder(ref_ids).last_hidden_state.numpy()
    merged = merge_lora(tparams, tparams["lora"])
    got_ctx = tpipe.text_encoder.apply({"params": merged["text_encoder"]}, ids).last_hidden_state
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    t = np.array([500])
    with torch.no_grad():
        want = ref.unet(torch.from_numpy(sample), torch.from_numpy(t), torch.from_numpy(want_ctx)).sample.numpy()
    got = tpipe.unet.apply({"params": merged["unet"]}, sample, t, got_ctx)
    errs = rel_err(got_ctx, want_ctx), rel_err(got, want)
    print(f"\n[trained token + LoRA in diffusers vs sdjax] rel err text {errs[0]:.1e}, UNet {errs[1]:.1e}")
    assert max(errs) <= 1e-5


@pytest.mark.slow
def test_lora_evaluation_runs_end_to_end(tmp_path):
    """evaluate_lora (the concept's prompts, the old prompts with and without the adapter, the autoencoder's
    reconstructions of real concept images): every figure present and in range, its pictures written. Untrained
    classifiers are cached in its classifier folder first (training the real ones takes minutes), so the figures
    check the plumbing, not the model."""
    from flax import serialization

    from sdjax.train import data
    from sdjax.train import evaluate as ev
    from sdjax.train import lora

    classifiers = tmp_path / "classifiers"
    classifiers.mkdir()
    for extra in ((), ("orange",)):
        clf = ev.ShapesClassifier(*ev.class_counts(extra)).init(jax.random.PRNGKey(1), np.zeros((1, 32, 32, 3)))
        name = "classifier_32" + "".join(f"+{n}" for n in extra) + ".msgpack"
        (classifiers / name).write_bytes(serialization.to_bytes(clf["params"]))
    cfg = config("token_init=[]", "eval_per_caption=1", "eval_steps=2")
    summary = lora.train_and_evaluate(cfg, tmp_path / "run", progress=False, classifier_dir=classifiers)
    e = summary["evaluation"]
    assert e["concept"] == "orange" and e["concept_images"] == len(data.SHAPES) * len(data.BACKGROUNDS)
    assert set(e["vae_reconstructions_by_background"]) == set(data.BACKGROUND_NAMES)
    figures = [e["concept_produced"], e["vae_reconstructions"], *e["concept_produced_by_background"].values(),
               *e["old_prompts_with_lora"].values(), *e["old_prompts_base"].values()]
    assert all(0.0 <= f <= 1.0 for f in figures), figures
    assert set(e["old_prompts_change_points"]) == {"color", "shape", "background"}
    for name in ("samples_orange.png", "samples_old_prompts_with_lora.png", "samples_old_prompts_base.png"):
        assert (tmp_path / "run" / name).is_file(), name
