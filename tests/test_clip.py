"""CLIPTextModel (sdjax.models.clip_text) against transformers' PyTorch CLIPTextModel, and the tokenizer loader."""

import json
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from sdjax.errors import ConfigError, SdjaxError, WeightsError
from sdjax.models.clip_text import CLIPTextModel
from sdjax.tokenizer import load_tokenizer
from sdjax.testing import perturb_, rel_err
from sdjax.testing import write_tiny_tokenizer

torch = pytest.importorskip("torch", reason="the PyTorch reference is a test extra: pip install torch==2.13.0 && pip install -e '.[test]'")
transformers = pytest.importorskip("transformers", reason="the PyTorch reference is a test extra: pip install torch==2.13.0 && pip install -e '.[test]'")

pytestmark = pytest.mark.parity  # every test here compares with the PyTorch reference

FP32_TOL = 1e-4
# bf16 params and compute vs the fp32 torch reference, relative to each output's max |value|.
# Measured max 1.4e-2 (last_hidden_state, "gelu" with mask) over the configs, outputs and hidden states below;
# transformers' own bf16 model against its fp32 self: 1.1e-2 .. 1.3e-2 on the same inputs.
BF16_TOL = 3e-2
WEIGHTS = "model.safetensors"

VOCAB = 100
BOS, EOS = 98, 99
CONFIGS = {
    # SD 1.x style: quick_gelu, legacy eos_token_id=2 (pooling at argmax of the ids), padded with EOS.
    "quick_gelu": dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, hidden_act="quick_gelu",
                       eos_token_id=2, bos_token_id=0, pad_token_id=1),
    # SD 2.x style: gelu (exact erf), pooling at the first eos_token_id, padded with id 0 ("!").
    "gelu": dict(hidden_size=48, intermediate_size=96, num_attention_heads=4, hidden_act="gelu",
                 eos_token_id=EOS, bos_token_id=BOS, pad_token_id=0),
    "gelu_new": dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, hidden_act="gelu_new",
                     eos_token_id=EOS, bos_token_id=BOS, pad_token_id=0),
}
COMMON = dict(vocab_size=VOCAB, num_hidden_layers=2, max_position_embeddings=77, projection_dim=16)


def make_ids(pad_id, length=77, lengths=(5, 12, 77)):
    """[BOS, tokens..., EOS, pad...]: one row per prompt length (77 = no room for padding, EOS last)."""
    rng = np.random.default_rng(0)
    rows, masks = [], []
    for n in lengths:
        n = min(n, length - 2)
        row = [BOS, *rng.integers(3, BOS, n).tolist(), EOS]
        masks.append([1] * len(row) + [0] * (length - len(row)))
        rows.append(row + [pad_id] * (length - len(row)))
    return np.array(rows, np.int32), np.array(masks, np.int32)


@pytest.fixture(scope="module")
def torch_dirs(tmp_path_factory):
    """name -> (folder saved by transformers, the torch model). Perturbed tiny random models."""
    out = {}
    for i, (name, spec) in enumerate(CONFIGS.items()):
        torch.manual_seed(i)
        model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**COMMON, **spec)).eval()
        perturb_(model, seed=i)
        d = tmp_path_factory.mktemp(f"clip_{name}")
        model.save_pretrained(d)
        out[name] = (d, model)
    return out


def torch_outputs(model, ids, mask=None):
    with torch.no_grad():
        o = model(torch.from_numpy(ids).long(), attention_mask=None if mask is None else torch.from_numpy(mask).long(),
                  output_hidden_states=True)
    return {"last_hidden_state": o.last_hidden_state.numpy(), "pooler_output": o.pooler_output.numpy(),
            "hidden_states": [h.numpy() for h in o.hidden_states]}


def jax_outputs(model, params, ids, mask=None):
    o = jax.jit(lambda p, i, m: model.apply({"params": p}, i, m, output_hidden_states=True))(params, ids, mask)
    return {"last_hidden_state": np.asarray(o.last_hidden_state, np.float32),
            "pooler_output": np.asarray(o.pooler_output, np.float32),
            "hidden_states": [np.asarray(h, np.float32) for h in o.hidden_states]}


def max_errors(ours, ref):
    assert len(ours["hidden_states"]) == len(ref["hidden_states"]) == COMMON["num_hidden_layers"] + 1
    errs = {k: rel_err(ours[k], ref[k]) for k in ("last_hidden_state", "pooler_output")}
    errs.update({f"hidden_states[{i}]": rel_err(a, b) for i, (a, b) in enumerate(zip(ours["hidden_states"],
                                                                                      ref["hidden_states"]))})
    return errs


def tree_equal(a, b):
    return jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b) and all(
        np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree_util.tree_leaves(a),
                                                                     jax.tree_util.tree_leaves(b)))


# ---------------------------------------------------------------------- parity


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_fp32_and_bf16(torch_dirs, name):
    d, tmodel = torch_dirs[name]
    ids, mask = make_ids(CONFIGS[name]["pad_token_id"])
    model, params = CLIPTextModel.from_pretrained(d)
    assert model.hidden_act == CONFIGS[name]["hidden_act"]
    masks = [None] if name == "quick_gelu" else [None, mask]  # SD 1.x never passes a mask; check it once
    for m in masks:
        ref = torch_outputs(tmodel, ids, m)
        errs = max_errors(jax_outputs(model, params, ids, m), ref)
        assert max(errs.values()) <= FP32_TOL, errs

        model16, params16 = CLIPTextModel.from_pretrained(d, dtype=jnp.bfloat16)
        out16 = jax_outputs(model16, params16, ids, m)
        errs16 = max_errors(out16, ref)
        assert max(errs16.values()) <= BF16_TOL, errs16


def test_padding_mask_changes_only_what_it_should(torch_dirs):
    """With right padding and a causal mask, real tokens never see padding: the mask only changes the
    padded positions (checks the mask is wired at all: torch agrees in test_parity)."""
    d, _ = torch_dirs["gelu"]
    model, params = CLIPTextModel.from_pretrained(d)
    ids, mask = make_ids(0, lengths=(5,))
    a = model.apply({"params": params}, ids).last_hidden_state
    b = model.apply({"params": params}, ids, mask).last_hidden_state
    n = int(mask.sum())
    np.testing.assert_allclose(a[:, :n], b[:, :n], rtol=1e-5, atol=1e-5)
    assert not np.allclose(a[:, n:], b[:, n:], atol=1e-3)


# ---------------------------------------------------------------------- key layouts


def test_both_key_layouts_load_identically(torch_dirs, tmp_path):
    """transformers 5 writes unprefixed keys; transformers 4 (every SD repo) `text_model.`-prefixed keys,
    some with the `position_ids` buffer. Both give the same params; a third layout fails loudly."""
    d, tmodel = torch_dirs["quick_gelu"]
    state = load_file(d / WEIGHTS)
    assert not any(k.startswith("text_model.") for k in state)  # transformers 5's own layout
    v4 = tmp_path / "v4"
    v4.mkdir()
    shutil.copy(d / "config.json", v4 / "config.json")
    v4_state = {f"text_model.{k}": v for k, v in state.items()}
    v4_state["text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
    save_file(v4_state, v4 / WEIGHTS)

    model5, p5 = CLIPTextModel.from_pretrained(d)
    model4, p4 = CLIPTextModel.from_pretrained(v4)
    assert tree_equal(p4, p5)
    ids, _ = make_ids(1)
    o4, o5 = model4.apply({"params": p4}, ids), model5.apply({"params": p5}, ids)
    np.testing.assert_array_equal(o4.last_hidden_state, o5.last_hidden_state)
    np.testing.assert_array_equal(o4.pooler_output, o5.pooler_output)

    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(d / "config.json", bad / "config.json")
    save_file({f"model.{k}": v for k, v in state.items()}, bad / WEIGHTS)
    with pytest.raises(WeightsError) as e:
        CLIPTextModel.from_pretrained(bad)
    msg = str(e.value)
    assert "NONE of the model's parameters" in msg
    assert "model.encoder.layers.0.self_attn.q_proj.weight" in msg  # listed as unexpected

    # One tensor missing from a v4 file is named (with the prefix stripped: the model's own name).
    del v4_state["text_model.final_layer_norm.bias"]
    save_file(v4_state, v4 / WEIGHTS)
    with pytest.raises(WeightsError, match=r"1 missing[\s\S]*final_layer_norm\.bias"):
        CLIPTextModel.from_pretrained(v4)


def test_save_roundtrip_through_transformers(torch_dirs, tmp_path):
    """sdjax save_pretrained -> transformers CLIPTextModel.from_pretrained: every tensor used, same outputs."""
    d, tmodel = torch_dirs["gelu"]
    model, params = CLIPTextModel.from_pretrained(d)
    out = tmp_path / "saved"
    model.save_pretrained(out, params)
    saved = load_file(out / WEIGHTS)
    assert all(k.startswith("text_model.") for k in saved)  # the layout transformers 4 and 5 both load
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["CLIPTextModel"] and cfg["model_type"] == "clip_text_model"

    reloaded, info = transformers.CLIPTextModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ids, mask = make_ids(0)
    a, b = torch_outputs(reloaded.eval(), ids, mask), torch_outputs(tmodel, ids, mask)
    for k in ("last_hidden_state", "pooler_output"):
        np.testing.assert_array_equal(a[k], b[k])
    # and sdjax reads its own file back bit for bit
    _, again = CLIPTextModel.from_pretrained(out)
    assert tree_equal(again, params)


def test_legacy_transformers_flax_msgpack(torch_dirs, tmp_path):
    """Old SD Flax repos ship text_encoder/flax_model.msgpack from transformers' FlaxCLIPTextModel:
    params under 'text_model', layers as encoder/layers/<i>. They load to the same params."""
    from flax.serialization import msgpack_serialize

    d, _ = torch_dirs["gelu"]
    _, params = CLIPTextModel.from_pretrained(d)
    enc = dict(params["encoder"])
    layers = {k.split("_")[1]: enc.pop(k) for k in list(enc) if k.startswith("layers_")}
    legacy = {"text_model": {**{k: v for k, v in params.items() if k != "encoder"},
                             "encoder": {**enc, "layers": layers}}}
    legacy = jax.tree_util.tree_map(np.asarray, legacy)
    out = tmp_path / "legacy"
    out.mkdir()
    shutil.copy(d / "config.json", out / "config.json")
    (out / "flax_model.msgpack").write_bytes(msgpack_serialize(legacy))
    _, again = CLIPTextModel.from_pretrained(out)
    assert tree_equal(again, params)


# ---------------------------------------------------------------------- config


SD15_TEXT_CONFIG = {
    "_name_or_path": "openai/clip-vit-large-patch14", "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2, "hidden_act": "quick_gelu",
    "hidden_size": 768, "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 3072,
    "layer_norm_eps": 1e-05, "max_position_embeddings": 77, "model_type": "clip_text_model",
    "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 1, "projection_dim": 768,
    "torch_dtype": "float32", "transformers_version": "4.22.0.dev0", "vocab_size": 49408,
}
SD2_TEXT_CONFIG = dict(SD15_TEXT_CONFIG, hidden_act="gelu", hidden_size=1024, intermediate_size=4096,
                       num_attention_heads=16, num_hidden_layers=23, projection_dim=512)


@pytest.mark.parametrize("config, n_params", [(SD15_TEXT_CONFIG, 123_060_480), (SD2_TEXT_CONFIG, 340_387_840)],
                         ids=["sd15", "sd2"])
def test_real_config_shapes(config, n_params):
    model = CLIPTextModel.from_config(config)
    shapes = model.param_shapes()
    assert sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes)) == n_params
    assert shapes["encoder"][f"layers_{config['num_hidden_layers'] - 1}"]["self_attn"]["q_proj"]["kernel"].shape == \
        (config["hidden_size"],) * 2
    assert shapes["embeddings"]["token_embedding"]["embedding"].shape == (49408, config["hidden_size"])
    out = jax.eval_shape(lambda p, i: model.apply({"params": p}, i, output_hidden_states=True), shapes,
                         jax.ShapeDtypeStruct((2, 77), jnp.int32))
    assert out.last_hidden_state.shape == (2, 77, config["hidden_size"])
    assert out.pooler_output.shape == (2, config["hidden_size"])
    assert len(out.hidden_states) == config["num_hidden_layers"] + 1


def test_unsupported_config_values():
    with pytest.raises(ConfigError, match=r"'hidden_act' = 'relu'.*supported: 'quick_gelu', 'gelu'"):
        CLIPTextModel.from_config(dict(SD15_TEXT_CONFIG, hidden_act="relu"))
    with pytest.raises(ConfigError, match="'eos_token_id'"):
        CLIPTextModel.from_config(dict(SD15_TEXT_CONFIG, eos_token_id=[2, 3]))
    assert CLIPTextModel.from_config(SD15_TEXT_CONFIG).config["eos_token_id"] == 2


# ---------------------------------------------------------------------- tokenizer


WORDS = ["a", "photo", "of", "cat", "dog", "the", "astronaut", "riding", "horse", "on", "mars"]


def write_vocab_merges(folder):
    return write_tiny_tokenizer(folder, WORDS)


PROMPTS = ["a photo of a cat", "An astronaut riding a horse on Mars, 🐴!", "", "the dog " * 60]


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    vocab = write_vocab_merges(root / "hub" / "tokenizer")
    # transformers 5's layout: what its save_pretrained writes, keeping only tokenizer.json
    full = root / "v5_full"
    load_tokenizer(root / "hub").save_pretrained(full)
    (root / "v5" / "tokenizer").mkdir(parents=True)
    shutil.copy(full / "tokenizer.json", root / "v5" / "tokenizer" / "tokenizer.json")
    return root, vocab


def test_tokenizer_layouts_give_identical_ids(tokenizer_dirs):
    root, vocab = tokenizer_dirs
    hub, v5 = load_tokenizer(root / "hub"), load_tokenizer(root / "v5")
    assert sorted(p.name for p in (root / "v5" / "tokenizer").iterdir()) == ["tokenizer.json"]
    assert hub.model_max_length == v5.model_max_length == 77
    enc = lambda t: t(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="np").input_ids
    ids_hub, ids_v5 = enc(hub), enc(v5)
    assert ids_hub.shape == (len(PROMPTS), 77)
    np.testing.assert_array_equal(ids_hub, ids_v5)

    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    expected = [bos] + [vocab[w + "</w>"] for w in "a photo of a cat".split()] + [eos]
    assert ids_hub[0].tolist() == expected + [eos] * (77 - len(expected))  # whole-word merges applied, EOS pad
    assert ids_hub[2].tolist() == [bos] + [eos] * 76  # empty prompt
    assert ids_hub[3][0] == bos and ids_hub[3][-1] == eos and (ids_hub[3][1:-1] != eos).all()  # truncated
    assert vocab["mars</w>"] in ids_hub[1] and vocab["a</w>"] in ids_hub[1]  # lower-cased


def test_tokenizer_folder_forms_and_errors(tokenizer_dirs, tmp_path, monkeypatch):
    root, _ = tokenizer_dirs
    # the tokenizer folder itself, with or without subfolder=None
    a = load_tokenizer(root / "hub" / "tokenizer", subfolder=None)
    b = load_tokenizer(root / "hub" / "tokenizer")
    assert a("a cat").input_ids == b("a cat").input_ids

    with pytest.raises(SdjaxError, match=r"tokenizer folder not found: .*nope.*vocab.json \+ merges.txt, or tokenizer.json"):
        load_tokenizer(tmp_path / "nope")
    empty = tmp_path / "pipe" / "tokenizer"
    empty.mkdir(parents=True)
    (empty / "vocab.json").write_text("{}")  # merges.txt missing
    with pytest.raises(SdjaxError, match=r"no tokenizer files in .*pipe/tokenizer: expected vocab.json \+ merges.txt, "
                                         r"or tokenizer.json \(has: vocab.json\)"):
        load_tokenizer(tmp_path / "pipe")
    with pytest.raises(SdjaxError, match=r"tokenizer folder not found: .*pipe/tok2"):
        load_tokenizer(tmp_path / "pipe", subfolder="tok2")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SdjaxError, match="no-such-owner/no-such-model"):
        load_tokenizer("no-such-owner/no-such-model")
