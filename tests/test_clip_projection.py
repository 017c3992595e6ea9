"""CLIPTextModelWithProjection (SDXL's text_encoder_2) against transformers' PyTorch CLIPTextModelWithProjection."""

import json
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from sdjax.errors import ConfigError, WeightsError
from sdjax.models.clip_text import CLIPTextModel, CLIPTextModelWithProjection
from sdjax.testing import perturb_, rel_err, torch_named_shapes
from sdjax.validation import wrong_values

torch = pytest.importorskip("torch", reason="the PyTorch reference is a test extra: pip install torch==2.13.0 && pip install -e '.[test]'")
transformers = pytest.importorskip("transformers", reason="the PyTorch reference is a test extra: pip install torch==2.13.0 && pip install -e '.[test]'")

pytestmark = pytest.mark.parity  # every test here compares with the PyTorch reference

# Measured max rel err over the outputs and every hidden state, with and without mask: 3e-7 .. 6e-7 (fp32).
FP32_TOL = 1e-5
WEIGHTS = "model.safetensors"
VOCAB, BOS, EOS = 100, 98, 99
# bigG-like in miniature: gelu, padded with "!" (id 0), pooled at the first EOS; 3 layers so that
# hidden_states[-2] (SDXL's conditioning) is neither the embeddings nor the last layer.
CONFIG = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=3,
              max_position_embeddings=77, projection_dim=24, hidden_act="gelu", eos_token_id=EOS, bos_token_id=BOS,
              pad_token_id=0)


def make_ids(lengths=(5, 12, 75)):
    """[BOS, tokens..., EOS, pad...] and the matching attention mask, one row per prompt length."""
    rng = np.random.default_rng(0)
    rows, masks = [], []
    for n in lengths:
        row = [BOS, *rng.integers(3, BOS, n).tolist(), EOS]
        masks.append([1] * len(row) + [0] * (77 - len(row)))
        rows.append(row + [CONFIG["pad_token_id"]] * (77 - len(row)))
    return np.array(rows, np.int32), np.array(masks, np.int32)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(folder saved by transformers, the perturbed torch model)."""
    torch.manual_seed(0)
    model = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**CONFIG)).eval()
    perturb_(model, seed=0)
    folder = tmp_path_factory.mktemp("clip_proj")
    model.save_pretrained(folder)
    return folder, model


def torch_outputs(model, ids, mask=None):
    with torch.no_grad():
        o = model(torch.from_numpy(ids).long(), attention_mask=None if mask is None else torch.from_numpy(mask).long(),
                  output_hidden_states=True)
    return {"text_embeds": o.text_embeds.numpy(), "last_hidden_state": o.last_hidden_state.numpy(),
            "hidden_states": [h.numpy() for h in o.hidden_states]}


def jax_outputs(model, params, ids, mask=None):
    o = jax.jit(lambda p, i, m: model.apply({"params": p}, i, m, output_hidden_states=True))(params, ids, mask)
    return {"text_embeds": np.asarray(o.text_embeds), "last_hidden_state": np.asarray(o.last_hidden_state),
            "hidden_states": [np.asarray(h) for h in o.hidden_states]}


def errors(ours, ref):
    assert len(ours["hidden_states"]) == len(ref["hidden_states"]) == CONFIG["num_hidden_layers"] + 1
    errs = {k: rel_err(ours[k], ref[k]) for k in ("text_embeds", "last_hidden_state")}
    errs.update({f"hidden_states[{i}]": rel_err(a, b) for i, (a, b) in enumerate(zip(ours["hidden_states"],
                                                                                      ref["hidden_states"]))})
    return errs


def tree_equal(a, b):
    return jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b) and all(
        np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree_util.tree_leaves(a),
                                                                     jax.tree_util.tree_leaves(b)))


def test_parity_fp32(reference):
    folder, tmodel = reference
    model, params = CLIPTextModelWithProjection.from_pretrained(folder)
    assert set(params) == {"text_model", "text_projection"} and set(params["text_projection"]) == {"kernel"}
    ids, mask = make_ids()
    for m in (None, mask):
        ref = torch_outputs(tmodel, ids, m)
        ours = jax_outputs(model, params, ids, m)
        errs = errors(ours, ref)
        print(f"\nmask={m is not None}: max fp32 rel err {max(errs.values()):.2e}",
              {k: f"{v:.1e}" for k, v in errs.items()})
        assert max(errs.values()) <= FP32_TOL, errs
        assert ours["text_embeds"].shape == (3, CONFIG["projection_dim"])
        assert ours["hidden_states"][-2].shape == (3, 77, CONFIG["hidden_size"])  # SDXL's conditioning


def test_key_layouts_and_strictness(reference, tmp_path):
    """transformers 4 and 5 both save `text_model.*` + `text_projection.weight` for this class (4 with the
    `position_ids` buffer): both load to the same params. A missing projection is named."""
    folder, _ = reference
    state = load_file(folder / WEIGHTS)
    assert "text_projection.weight" in state and all(k.startswith(("text_model.", "text_projection.")) for k in state)
    v4 = tmp_path / "v4"
    v4.mkdir()
    shutil.copy(folder / "config.json", v4 / "config.json")
    save_file(state | {"text_model.embeddings.position_ids": np.arange(77, dtype=np.int64)[None]}, v4 / WEIGHTS)
    _, p5 = CLIPTextModelWithProjection.from_pretrained(folder)
    _, p4 = CLIPTextModelWithProjection.from_pretrained(v4)
    assert tree_equal(p4, p5)

    no_proj = tmp_path / "no_proj"
    no_proj.mkdir()
    shutil.copy(folder / "config.json", no_proj / "config.json")
    save_file({k: v for k, v in state.items() if k != "text_projection.weight"}, no_proj / WEIGHTS)
    with pytest.raises(WeightsError, match=r"1 missing[\s\S]*text_projection\.weight"):
        CLIPTextModelWithProjection.from_pretrained(no_proj)
    # ... and the text model alone refuses the projection it has no place for
    with pytest.raises(WeightsError, match=r"unexpected[\s\S]*text_projection\.weight"):
        CLIPTextModel.from_pretrained(folder)


def test_save_roundtrip_through_transformers(reference, tmp_path):
    """sdjax save_pretrained -> transformers from_pretrained: every tensor used, same outputs; and back."""
    folder, tmodel = reference
    model, params = CLIPTextModelWithProjection.from_pretrained(folder)
    out = tmp_path / "saved"
    model.save_pretrained(out, params)
    assert set(load_file(out / WEIGHTS)) == set(load_file(folder / WEIGHTS))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["CLIPTextModelWithProjection"] and cfg["model_type"] == "clip_text_model"

    reloaded, info = transformers.CLIPTextModelWithProjection.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ids, mask = make_ids()
    a, b = torch_outputs(reloaded.eval(), ids, mask), torch_outputs(tmodel, ids, mask)
    for k in ("text_embeds", "last_hidden_state"):
        np.testing.assert_array_equal(a[k], b[k])
    again_model, again = CLIPTextModelWithProjection.from_pretrained(out)
    assert tree_equal(again, params) and again_model.config == model.config


def test_legacy_transformers_flax_msgpack(reference, tmp_path):
    """transformers' FlaxCLIPTextModelWithProjection msgpack (layers as encoder/layers/<i>) loads the same."""
    from flax.serialization import msgpack_serialize

    folder, _ = reference
    _, params = CLIPTextModelWithProjection.from_pretrained(folder)
    text = dict(params["text_model"])
    enc = dict(text.pop("encoder"))
    layers = {k.split("_")[1]: enc.pop(k) for k in list(enc) if k.startswith("layers_")}
    legacy = jax.tree_util.tree_map(np.asarray, {"text_model": {**text, "encoder": {**enc, "layers": layers}},
                                                 "text_projection": params["text_projection"]})
    out = tmp_path / "legacy"
    out.mkdir()
    shutil.copy(folder / "config.json", out / "config.json")
    (out / "flax_model.msgpack").write_bytes(msgpack_serialize(legacy))
    assert tree_equal(CLIPTextModelWithProjection.from_pretrained(out)[1], params)


# ---------------------------------------------------------------------- config

# stabilityai/stable-diffusion-xl-base-1.0/text_encoder_2/config.json (OpenCLIP ViT-bigG/14's text tower).
SDXL_TEXT_ENCODER_2_CONFIG = {
    "architectures": ["CLIPTextModelWithProjection"], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0,
    "eos_token_id": 2, "hidden_act": "gelu", "hidden_size": 1280, "initializer_factor": 1.0,
    "initializer_range": 0.02, "intermediate_size": 5120, "layer_norm_eps": 1e-05, "max_position_embeddings": 77,
    "model_type": "clip_text_model", "num_attention_heads": 20, "num_hidden_layers": 32, "pad_token_id": 1,
    "projection_dim": 1280, "torch_dtype": "float16", "transformers_version": "4.32.0.dev0", "vocab_size": 49408,
}


def test_real_sdxl_text_encoder_2_has_transformers_parameters():
    """Every parameter name and shape of bigG's text tower equals transformers' (meta device, eval_shape)."""
    config = {k: v for k, v in SDXL_TEXT_ENCODER_2_CONFIG.items()
              if k not in ("architectures", "model_type", "torch_dtype", "transformers_version")}
    with torch.device("meta"):
        reference = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**config))
    expected = {k: tuple(p.shape) for k, p in reference.named_parameters()}
    model = CLIPTextModelWithProjection.from_config(SDXL_TEXT_ENCODER_2_CONFIG)
    shapes = model.param_shapes()
    ours = torch_named_shapes(shapes)
    n_ours = sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes))
    n_expected = sum(p.numel() for p in reference.parameters())
    print(f"\nSDXL text_encoder_2 parameters: sdjax {n_ours:,}, transformers {n_expected:,}")
    assert ours == expected
    assert n_ours == n_expected
    out = jax.eval_shape(lambda p, i: model.apply({"params": p}, i, output_hidden_states=True), shapes,
                         jax.ShapeDtypeStruct((2, 77), jnp.int32))
    assert out.text_embeds.shape == (2, 1280) and out.last_hidden_state.shape == (2, 77, 1280)
    assert len(out.hidden_states) == 33


@pytest.mark.parametrize("key", list(CLIPTextModelWithProjection.config_fields()))
def test_wrong_config_types_are_clear_errors(key):
    hints = CLIPTextModelWithProjection.config_types()
    for bad in wrong_values(hints[key]):
        with pytest.raises(ConfigError, match=f"CLIPTextModelWithProjection: config key '{key}'.*some/config.json"):
            CLIPTextModelWithProjection.from_config({key: bad}, source="some/config.json")


def test_projection_dim_is_required():
    assert CLIPTextModel.from_config(dict(CONFIG, projection_dim=None)).projection_dim is None  # unused there
    with pytest.raises(ConfigError, match="'projection_dim' = None"):
        CLIPTextModelWithProjection.from_config(dict(CONFIG, projection_dim=None))
