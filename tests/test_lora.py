"""LoRA (sdjax.lora) and textual inversion (sdjax.textual_inversion).

Parity tests compare with diffusers/transformers PyTorch on the tiny random SD folder (fp32, CPU):
  * UNet LoRAs made by PEFT (`LoraConfig` + diffusers `unet.add_adapter`, weights perturbed, saved by
    `StableDiffusionPipeline.save_lora_weights` with the adapter config as metadata) and a Kohya file written here
    from the same numbers (alpha != rank, LoCon convs with their own alpha): the UNet with sdjax's merged params vs
    diffusers after `load_lora_weights` + `set_adapters` (PEFT computing the LoRA branch unmerged);
  * text-encoder LoRAs against a hand-computed PyTorch reference (each weight + scale * alpha/rank * up @ down, run
    through transformers' CLIPTextModel): transformers 5's PEFT integration needs peft >= 0.22, which the registry
    does not serve, so diffusers cannot load text-encoder LoRAs here;
  * textual inversion against diffusers' `load_textual_inversion`.
The other tests need no torch: params are random arrays of the tiny models' shapes.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from sdjax import convert
from sdjax.errors import AdapterError, SdjaxError
from sdjax.io import write_safetensors
from sdjax.lora import fuse_lora, load_lora, merge_lora, save_lora, unfuse_lora
from sdjax.models.clip_text import CLIPTextModel
from sdjax.models.unet_2d_condition import UNet2DConditionModel
from sdjax.testing import TEXT, UNET, rel_err

# Every kind of layer the tiny UNet has: attention (Dense), feed-forward, 1x1 conv proj_in/out, 3x3 resnet convs
# (LoCon), shortcuts, time embeddings, down/up-sampler convs, conv_in/out.
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
                "conv_shortcut", "time_emb_proj", "conv", "conv_in", "conv_out", "linear_1", "linear_2"]
TEXT_TARGETS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2"]
TOL = 1e-5  # the base UNet/CLIP parity is ~1e-6 relative


# ---------------------------------------------------------------------------------------------- torch-free fixtures
def _random_tree(shapes, seed):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda s: jnp.asarray(rng.standard_normal(s.shape).astype(np.float32) * 0.1), shapes)


@pytest.fixture(scope="module")
def models():
    unet = UNet2DConditionModel.from_config(dict(UNET))
    text = CLIPTextModel.from_config(TEXT | {"vocab_size": 600})
    params = {"unet": _random_tree(unet.param_shapes(), 0), "text_encoder": _random_tree(text.param_shapes(), 1)}
    return unet, text, params


def _kernels(tree, component):
    """{PyTorch module name: Flax kernel shape} of every layer."""
    return {convert.path_to_torch_key(p[:-1]): tuple(v.shape) for p, v in convert.flat_params(tree).items()
            if p[-1] == "kernel"}


def _torch_shapes(kshape, rank):
    """(lora_A, lora_B) shapes in PyTorch layouts for a Flax kernel shape."""
    if len(kshape) == 2:
        return (rank, kshape[0]), (kshape[1], rank)
    return (rank, kshape[2], kshape[0], kshape[1]), (kshape[3], rank, 1, 1)


def peft_state(params, component, names, rank=4, seed=0, prefix=""):
    rng = np.random.default_rng(seed)
    kernels = _kernels(params[component], component)
    out = {}
    for n in names:
        a, b = _torch_shapes(kernels[n], rank)
        out[f"{component}.{prefix}{n}.lora_A.weight"] = (rng.standard_normal(a) * 0.1).astype(np.float32)
        out[f"{component}.{prefix}{n}.lora_B.weight"] = (rng.standard_normal(b) * 0.1).astype(np.float32)
    return out


def to_kohya(state, alpha_of=None):
    """diffusers/PEFT names -> Kohya names (`lora_unet_...`, `lora_te_...`), with an `alpha` per layer."""
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}
    out = {}
    for key, v in state.items():
        if not key.endswith(".lora_A.weight"):
            continue
        component, _, module = key[: -len(".lora_A.weight")].partition(".")
        name = prefixes[component] + module.replace(".", "_")
        out[f"{name}.lora_down.weight"] = v
        out[f"{name}.lora_up.weight"] = state[key.replace(".lora_A.", ".lora_B.")]
        if alpha_of is not None:
            out[f"{name}.alpha"] = np.asarray(alpha_of(module, v), np.float32)
    return out


UNET_LAYERS = ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
               "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
               "down_blocks.0.attentions.0.proj_in", "down_blocks.0.resnets.0.conv1",
               "down_blocks.1.resnets.0.conv_shortcut", "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj",
               "up_blocks.0.upsamplers.0.conv", "time_embedding.linear_1", "conv_in"]
TEXT_LAYERS = ["encoder.layers.0.self_attn.q_proj", "encoder.layers.1.mlp.fc2"]


# ---------------------------------------------------------------------------------------------- merge (no torch)
def test_merge_is_the_lora_formula_for_dense_and_conv(models):
    _, _, params = models
    state = peft_state(params, "unet", UNET_LAYERS, rank=3) | {
        f"unet.{n}.alpha": np.asarray(1.5, np.float32) for n in UNET_LAYERS}
    adapter = load_lora(state, params)
    assert sorted(adapter.layers["unet"]) == sorted("/".join(convert.torch_key_to_path(n)) for n in UNET_LAYERS)
    merged = merge_lora(params, {"a": adapter}, {"a": 0.7})
    for n in UNET_LAYERS:
        path = convert.torch_key_to_path(n)
        a, b = state[f"unet.{n}.lora_A.weight"], state[f"unet.{n}.lora_B.weight"]
        if a.ndim == 2:
            delta = (b @ a).T
        else:  # the PEFT conv rule: delta[o, i, h, w] = sum_r B[o, r] A[r, i, h, w], in HWIO
            delta = np.einsum("or,rihw->hwio", b[:, :, 0, 0], a)
        want = np.asarray(convert.flat_params(params["unet"])[path + ("kernel",)]) + 0.7 * 1.5 / 3 * delta
        got = convert.flat_params(merged["unet"])[path + ("kernel",)]
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7, err_msg=n)
    # everything else, and the components no adapter touches, are the same arrays
    assert merged["text_encoder"] is params["text_encoder"]
    assert merged["unet"]["conv_norm_out"]["scale"] is params["unet"]["conv_norm_out"]["scale"]


def test_scale_zero_is_exact_and_jit_compiles_once(models):
    _, _, params = models
    a = load_lora(peft_state(params, "unet", UNET_LAYERS, seed=1), params)
    b = load_lora(peft_state(params, "text_encoder", TEXT_LAYERS, seed=2) | peft_state(params, "unet", UNET_LAYERS[:3], seed=3),
                  params)
    merge = jax.jit(merge_lora)
    before = merge._cache_size()  # jax.jit(merge_lora) shares JAX's cache with sdjax's own jit of merge_lora
    zero = merge(params, {"a": a, "b": b}, {"a": 0.0, "b": 0.0})
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), zero, params)
    # traced scales, per component or not: one program
    results = [merge(params, {"a": a, "b": b}, {"a": s, "b": {"unet": s / 2, "text_encoder": -s}})
               for s in (0.0, 0.25, 1.0, 3.0)]
    assert merge._cache_size() <= before + 2  # the all-float dict above and this structure
    assert not np.allclose(results[1]["unet"]["conv_in"]["kernel"], results[2]["unet"]["conv_in"]["kernel"])
    # the same layers and ranks with other numbers: same tree structure, no new program
    a2 = load_lora(peft_state(params, "unet", UNET_LAYERS, seed=9), params)
    n = merge._cache_size()
    merge(params, {"a": a2, "b": b}, {"a": 0.5, "b": {"unet": 0.1, "text_encoder": 0.2}})
    assert merge._cache_size() == n


def test_merge_sums_adapters_and_keeps_dtype(models):
    _, _, params = models
    a = load_lora(peft_state(params, "unet", UNET_LAYERS, seed=1), params)
    b = load_lora(peft_state(params, "unet", UNET_LAYERS[:4], seed=2), params)
    both = merge_lora(params, {"a": a, "b": b}, {"a": 0.3, "b": -0.8})
    seq = fuse_lora(fuse_lora(params, a, 0.3), b, -0.8)
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), both, seq)
    half = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)
    merged = merge_lora(half, {"a": a})
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(merged))


def test_fuse_then_unfuse_restores_params(models):
    _, _, params = models
    adapter = load_lora(peft_state(params, "unet", UNET_LAYERS, seed=4) | peft_state(params, "text_encoder", TEXT_LAYERS),
                        params)
    for scale in (1.0, 0.6, {"unet": 0.5, "text_encoder": 2.0}):
        fused = jax.jit(fuse_lora)(params, adapter, scale)
        assert not np.allclose(fused["unet"]["conv_in"]["kernel"], params["unet"]["conv_in"]["kernel"])
        back = jax.jit(unfuse_lora)(fused, adapter, scale)
        err = max(float(jnp.abs(x - y).max()) for x, y in zip(jax.tree_util.tree_leaves(back),
                                                              jax.tree_util.tree_leaves(params)))
        assert err <= 1e-6, (scale, err)


def test_save_and_load_roundtrip(models, tmp_path):
    _, _, params = models
    state = peft_state(params, "unet", UNET_LAYERS, rank=4) | peft_state(params, "unet", UNET_LAYERS[3:5], rank=2, seed=5)
    state |= peft_state(params, "text_encoder", TEXT_LAYERS, rank=3)
    kohya = to_kohya(state, alpha_of=lambda m, a: 1.0 if a.ndim == 4 and a.shape[2] == 3 else 2.5)
    adapter = load_lora(kohya, params)
    written = save_lora(tmp_path / "saved", adapter)
    assert written.name == "pytorch_lora_weights.safetensors"
    again = load_lora(tmp_path / "saved", params)
    jax.tree_util.tree_map(np.testing.assert_array_equal, again, adapter)
    # diffusers/PEFT names and layouts; the text encoder under transformers 4's `text_model.`
    from safetensors import safe_open

    with safe_open(str(written), framework="numpy") as f:
        keys, meta = set(f.keys()), json.loads(f.metadata()["lora_adapter_metadata"])
        assert f.get_tensor("unet.down_blocks.0.resnets.0.conv1.lora_A.weight").shape == (2, 32, 3, 3)
        assert f.get_tensor("unet.down_blocks.0.resnets.0.conv1.lora_B.weight").shape == (32, 2, 1, 1)
    assert "text_encoder.text_model.encoder.layers.1.mlp.fc2.lora_B.weight" in keys
    assert meta["unet.r"] == 4 and meta["unet.lora_alpha"] == 2.5 and meta["text_encoder.lora_alpha"] == 2.5


def test_old_diffusers_names_load_the_same(models):
    _, _, params = models
    names = ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
             "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0", "down_blocks.0.resnets.0.conv1"]
    state = peft_state(params, "unet", names) | peft_state(params, "text_encoder", TEXT_LAYERS, prefix="text_model.")
    old = {}
    for k, v in state.items():
        k = k.replace("lora_A.weight", "lora.down.weight").replace("lora_B.weight", "lora.up.weight")
        k = k.replace("attn1.to_q.lora.", "attn1.processor.to_q_lora.").replace("attn1.to_out.0.lora.",
                                                                                  "attn1.processor.to_out_lora.")
        k = k.replace("self_attn.q_proj.lora.", "self_attn.to_q_lora.").replace("mlp.fc2.lora.", "mlp.fc2.lora_linear_layer.")
        old[k] = v
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight" in old
    assert "text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora.down.weight" in old
    jax.tree_util.tree_map(np.testing.assert_array_equal, load_lora(old, params), load_lora(state, params))


# ---------------------------------------------------------------------------------------------- bad input (no torch)
def test_lora_for_another_architecture_names_layers_and_shapes(models):
    _, _, params = models
    other = UNet2DConditionModel.from_config(dict(UNET) | {"block_out_channels": (32, 96)})
    other_params = {"unet": other.param_shapes()}
    state = peft_state(other_params, "unet", ["down_blocks.1.resnets.0.conv1", "mid_block.attentions.0.proj_in",
                                              "down_blocks.0.resnets.0.conv1"])
    with pytest.raises(AdapterError) as e:
        load_lora(state, params)
    msg = str(e.value)
    assert "2 layers with the wrong shape" in msg
    assert "unet.down_blocks.1.resnets.0.conv1: the LoRA makes a weight of shape (96, 32, 3, 3)" in msg
    assert "the layer's weight is (64, 32, 3, 3)" in msg and "mid_block.attentions.0.proj_in" in msg
    # a linear LoRA on a conv layer of the wrong kind (3x3 down on a Dense)
    bad = {"unet.conv_in.lora_A.weight": np.zeros((2, 4, 3, 3), np.float32),
           "unet.conv_in.lora_B.weight": np.zeros((32, 2, 1, 1), np.float32),
           "unet.time_embedding.linear_1.lora_A.weight": np.zeros((2, 32, 3, 3), np.float32),
           "unet.time_embedding.linear_1.lora_B.weight": np.zeros((128, 2), np.float32)}
    with pytest.raises(AdapterError, match=r"time_embedding.linear_1: a 3x3 conv LoRA"):
        load_lora(bad, params)


def test_keys_matching_nothing_are_listed(models):
    _, _, params = models
    state = peft_state(params, "unet", UNET_LAYERS[:2])
    state["unet.down_blocks.5.attentions.0.proj_in.lora_A.weight"] = np.zeros((4, 32), np.float32)
    state["lora_unet_input_blocks_1_1_proj_in.lora_down.weight"] = np.zeros((4, 32), np.float32)
    state["something_else.weight"] = np.zeros((4,), np.float32)
    with pytest.raises(AdapterError) as e:
        load_lora(state, params)
    msg = str(e.value)
    assert "3 keys match no layer" in msg and "the original LDM/SGM UNet's names" in msg
    for k in ("unet.down_blocks.5.attentions.0.proj_in.lora_A.weight", "lora_unet_input_blocks_1_1_proj_in.lora_down",
              "something_else.weight"):
        assert k in msg
    # a component the params do not have (SDXL's second text encoder on an SD 1.x pipeline)
    te2 = {"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": np.zeros((4, 32), np.float32),
           "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": np.zeros((32, 4), np.float32)}
    with pytest.raises(AdapterError, match="2 keys are for text_encoder_2, which the params do not have"):
        load_lora(te2, params)
    # DoRA is not a LoRA: refused, named
    dora = peft_state(params, "unet", UNET_LAYERS[:1]) | {
        f"unet.{UNET_LAYERS[0]}.lora_magnitude_vector": np.ones((32,), np.float32)}
    with pytest.raises(AdapterError, match="lora_magnitude_vector \\(DoRA\\)"):
        load_lora(dora, params)


def test_inconsistent_ranks_and_incomplete_layers(models):
    _, _, params = models
    state = peft_state(params, "unet", UNET_LAYERS[:2])
    key = f"unet.{UNET_LAYERS[0]}.lora_B.weight"
    state[key] = np.zeros((32, 3), np.float32)
    del state[f"unet.{UNET_LAYERS[1]}.lora_B.weight"]
    with pytest.raises(AdapterError) as e:
        load_lora(state, params)
    msg = str(e.value)
    assert "1 layers whose down and up ranks differ" in msg
    assert f"unet.{UNET_LAYERS[0]}.lora_A.weight has rank 4 (shape (4, 32)) but {key} has rank 3" in msg
    assert f"{UNET_LAYERS[1]}: has unet.{UNET_LAYERS[1]}.lora_A.weight but no up" in msg


def test_files_folders_and_pickles(models, tmp_path):
    _, _, params = models
    state = peft_state(params, "unet", UNET_LAYERS[:2])
    write_safetensors(tmp_path / "style.safetensors", state)
    direct = load_lora(tmp_path / "style.safetensors", params)
    (tmp_path / "folder").mkdir()
    write_safetensors(tmp_path / "folder" / "pytorch_lora_weights.safetensors", state)
    write_safetensors(tmp_path / "folder" / "other.safetensors", {"x": np.zeros(1, np.float32)})
    jax.tree_util.tree_map(np.testing.assert_array_equal, load_lora(tmp_path / "folder", params), direct)
    (tmp_path / "folder" / "pytorch_lora_weights.safetensors").rename(tmp_path / "folder" / "style.safetensors")
    with pytest.raises(AdapterError, match="several .safetensors files .* pass weight_name="):
        load_lora(tmp_path / "folder", params)
    with pytest.raises(AdapterError, match="other.safetensors does not fit the model:\n  1 keys match no layer"):
        load_lora(tmp_path / "folder", params, weight_name="other.safetensors")
    jax.tree_util.tree_map(np.testing.assert_array_equal,
                           load_lora(tmp_path / "folder", params, weight_name="style.safetensors"), direct)
    for suffix in (".bin", ".pt", ".ckpt"):
        (tmp_path / f"lora{suffix}").write_bytes(b"not read")
        with pytest.raises(AdapterError, match=rf"lora\{suffix} is a pickle .* allow_pickle=True"):
            load_lora(tmp_path / f"lora{suffix}", params)
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "pytorch_lora_weights.bin").write_bytes(b"not read")
    with pytest.raises(AdapterError, match="pytorch_lora_weights.bin is a pickle"):
        load_lora(tmp_path / "pickled", params)
    with pytest.raises(AdapterError, match="LoRA file not found"):
        load_lora(tmp_path / "missing.safetensors", params)
    assert issubclass(AdapterError, SdjaxError)


def test_merge_errors(models):
    unet, text, params = models
    adapter = load_lora(peft_state(params, "text_encoder", TEXT_LAYERS), params)
    with pytest.raises(AdapterError, match="scales name adapters that are not loaded: \\['b'\\]"):
        merge_lora(params, {"a": adapter}, {"b": 1.0})
    with pytest.raises(AdapterError, match="unknown components \\['vae'\\]"):
        merge_lora(params, {"a": adapter}, {"a": {"vae": 1.0}})
    with pytest.raises(AdapterError, match="per-block scales are not supported"):
        merge_lora(params, {"a": adapter}, {"a": {"unet": {"down": 1.0}}})
    with pytest.raises(AdapterError, match="must be a scalar, got shape \\(2,\\)"):
        merge_lora(params, {"a": adapter}, {"a": np.ones(2)})
    # None is diffusers' "default weight": 1.0, as is a component the dict leaves out
    one = merge_lora(params, {"a": adapter})["text_encoder"]
    for scales in ({"a": None}, {"a": {"unet": 0.0}}):
        jax.tree_util.tree_map(np.testing.assert_array_equal, merge_lora(params, {"a": adapter}, scales)["text_encoder"], one)
    with pytest.raises(AdapterError, match="change text_encoder, which the params do not have"):
        merge_lora({"unet": params["unet"]}, {"a": adapter})
    wide = CLIPTextModel.from_config(TEXT | {"vocab_size": 600, "hidden_size": 40, "intermediate_size": 37})
    with pytest.raises(AdapterError, match="encoder.layers.0.self_attn.q_proj has kernel shape \\(40, 40\\)"):
        merge_lora({"text_encoder": _random_tree(wide.param_shapes(), 0)}, {"a": adapter})


# ---------------------------------------------------------------------------------------------- textual inversion (no torch)
@pytest.fixture()
def tokenizer(tmp_path):
    from sdjax.testing import write_tiny_tokenizer
    from sdjax.tokenizer import load_tokenizer

    write_tiny_tokenizer(tmp_path / "tok")
    return load_tokenizer(tmp_path / "tok", subfolder=None)


def test_textual_inversion_rows_tokens_and_errors(models, tokenizer, tmp_path):
    from sdjax.textual_inversion import load_textual_inversion, maybe_convert_prompt

    _, text, params = models
    te = params["text_encoder"]
    te = {**te, "embeddings": {**te["embeddings"], "token_embedding": {
        "embedding": te["embeddings"]["token_embedding"]["embedding"][: len(tokenizer)]}}}
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((3, 32)).astype(np.float32)
    write_safetensors(tmp_path / "learned_embeds.safetensors", {"<shape>": emb})
    n = len(tokenizer)
    ti = load_textual_inversion(tmp_path, tokenizer, te)
    assert ti.tokens == ["<shape>", "<shape>_1", "<shape>_2"] and ti.token_ids == [n, n + 1, n + 2]
    assert ti.vocab_size == n + 3
    table = np.asarray(ti.params["embeddings"]["token_embedding"]["embedding"])
    np.testing.assert_array_equal(table[n:], emb)
    np.testing.assert_array_equal(table[:n], te["embeddings"]["token_embedding"]["embedding"])
    assert maybe_convert_prompt("a <shape> on the moon", tokenizer) == "a <shape> <shape>_1 <shape>_2 on the moon"
    assert maybe_convert_prompt(["a cat"], tokenizer) == ["a cat"]
    # the grown module runs
    model = text.clone(vocab_size=ti.vocab_size)
    ids = tokenizer([maybe_convert_prompt("a <shape>", tokenizer)], padding="max_length", max_length=77,
                    return_tensors="np").input_ids
    assert n + 2 in ids[0]
    model.apply({"params": ti.params}, ids)

    # errors: the token exists; a width for another text encoder; pickles
    with pytest.raises(AdapterError, match=r"token\(s\) \['<shape>', '<shape>_1', '<shape>_2'\] already in the tokenizer"):
        load_textual_inversion(tmp_path, tokenizer, ti.params)
    assert len(tokenizer) == n + 3  # nothing added by the failed call
    write_safetensors(tmp_path / "wide.safetensors", {"emb_params": np.zeros((2, 48), np.float32)})
    with pytest.raises(AdapterError, match="wide.safetensors: the embedding 'wide' is 48 wide, the text encoder's "
                                           "token embeddings are 32 wide"):
        load_textual_inversion(tmp_path / "wide.safetensors", tokenizer, ti.params)
    (tmp_path / "a1111.pt").write_bytes(b"not read")
    with pytest.raises(AdapterError, match="a1111.pt is a pickle"):
        load_textual_inversion(tmp_path / "a1111.pt", tokenizer, ti.params)
    # SDXL: the embedding whose width fits, or the one asked for
    write_safetensors(tmp_path / "xl.safetensors", {"clip_l": np.ones((1, 32), np.float32),
                                                    "clip_g": np.zeros((1, 48), np.float32)})
    xl = load_textual_inversion(tmp_path / "xl.safetensors", tokenizer, ti.params, token="<xl>")
    np.testing.assert_array_equal(xl.params["embeddings"]["token_embedding"]["embedding"][-1], np.ones(32))
    with pytest.raises(AdapterError, match="is 48 wide"):
        load_textual_inversion(tmp_path / "xl.safetensors", tokenizer, ti.params, token="<xg>", embedding_key="clip_g")


# ---------------------------------------------------------------------------------------------- parity: UNet
@pytest.fixture(scope="module")
def unet_inputs():
    rng = np.random.default_rng(0)
    return (rng.standard_normal((2, 4, 16, 16)).astype(np.float32), np.array([10, 700]),
            rng.standard_normal((2, 7, UNET["cross_attention_dim"])).astype(np.float32))


@pytest.fixture(scope="module")
def lora_files(tiny_folder, tmp_path_factory):
    """PEFT LoRAs of the tiny UNet saved by diffusers, and Kohya/old-diffusers files from the same numbers."""
    pytest.importorskip("peft", reason="the LoRA references are made by PEFT: pip install peft")
    import torch
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    root = tmp_path_factory.mktemp("loras")
    files = {}
    configs = {
        # alpha != rank, one rank and one alpha by pattern: all through the saved LoraConfig metadata
        "a": (LoraConfig(r=4, lora_alpha=8, target_modules=UNET_TARGETS, rank_pattern={"conv1": 3},
                         alpha_pattern={"to_q": 1.5}), True),
        # no metadata: diffusers (and sdjax) scale by 1
        "b": (LoraConfig(r=2, lora_alpha=2, target_modules=["to_k", "to_v", "conv2", "ff.net.2", "proj_out"]), False),
    }
    states = {}
    for i, (name, (config, with_metadata)) in enumerate(configs.items()):
        pipe = StableDiffusionPipeline.from_pretrained(tiny_folder, safety_checker=None)
        pipe.unet.add_adapter(config, adapter_name=name)
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for n, p in pipe.unet.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        sd = get_peft_model_state_dict(pipe.unet, adapter_name=name)
        StableDiffusionPipeline.save_lora_weights(
            root / name, unet_lora_layers=sd,
            unet_lora_adapter_metadata=pipe.unet.peft_config[name].to_dict() if with_metadata else None)
        files[name] = root / name
        states[name] = {f"unet.{k}": v.numpy() for k, v in sd.items()}
    # Kohya, from a's numbers: alpha 2 for Dense and 1x1 layers (rank 4: scale 0.5), LoCon 3x3 convs alpha 1
    kohya = to_kohya(states["a"], alpha_of=lambda m, a: 1.0 if a.ndim == 4 and a.shape[2] == 3 else 2.0)
    write_safetensors(root / "kohya.safetensors", kohya)
    files["kohya"] = root / "kohya.safetensors"
    # diffusers' older names, from b's numbers
    old = {k.replace(".to_k.lora_A.", ".processor.to_k_lora.down.").replace(".to_k.lora_B.", ".processor.to_k_lora.up.")
           .replace("lora_A.weight", "lora.down.weight").replace("lora_B.weight", "lora.up.weight"): v
           for k, v in states["b"].items()}
    write_safetensors(root / "old.safetensors", old)
    files["old"] = root / "old.safetensors"
    return files


@pytest.fixture(scope="module")
def sdjax_unet(tiny_folder, unet_inputs):
    """(params, run): run(adapters, scales) is the UNet's output with the params merged under jit. The merge is
    its own program (compiled once per adapter structure) and the UNet one program for all tests."""
    unet, params = UNet2DConditionModel.from_pretrained(tiny_folder, subfolder="unet")
    params = {"unet": params}
    x, t, c = unet_inputs
    unet_fn = jax.jit(lambda p: unet.apply({"params": p}, x, t, c))
    merge = jax.jit(merge_lora)

    def run(adapters, scales):
        return np.asarray(unet_fn(merge(params, adapters, scales)["unet"]))

    run.merge = merge
    return params, run


def _diffusers_unet(tiny_folder, loads, inputs, weights_list):
    """diffusers' UNet output with the LoRAs `loads` [(file, name)] active at each of `weights_list`."""
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_folder, safety_checker=None)
    for path, name in loads:
        pipe.load_lora_weights(str(path), adapter_name=name)
    x, t, c = (torch.from_numpy(np.asarray(v)) for v in inputs)
    outs = []
    for weights in weights_list:
        pipe.set_adapters([name for _, name in loads], weights)
        with torch.no_grad():
            outs.append(pipe.unet(x, t, c).sample.numpy())
    return outs


@pytest.mark.parity
@pytest.mark.parametrize("kind", ["a", "kohya", "old"])
def test_unet_lora_matches_diffusers(kind, lora_files, sdjax_unet, tiny_folder, unet_inputs):
    params, run = sdjax_unet
    adapter = load_lora(lora_files[kind], params)
    scales = (0.0, 0.5, 1.0)
    refs = _diffusers_unet(tiny_folder, [(lora_files[kind], kind)], unet_inputs, [[s] for s in scales])
    before = run.merge._cache_size()
    errs = [rel_err(run({kind: adapter}, {kind: s}), ref) for s, ref in zip(scales, refs)]
    print(f"\n[{kind}: {adapter.summary()}] rel err at scales {scales}: " + ", ".join(f"{e:.1e}" for e in errs))
    assert max(errs) <= TOL
    assert rel_err(refs[0], refs[2]) > 1e-2, "the LoRA changes the output"
    assert run.merge._cache_size() <= before + 1, "one merge program for every scale"


@pytest.mark.parity
def test_two_unet_loras_mixed_match_diffusers(lora_files, sdjax_unet, tiny_folder, unet_inputs):
    params, run = sdjax_unet
    adapters = {n: load_lora(lora_files[n], params) for n in ("a", "kohya", "b")}
    weights = [[0.7, -0.4, 1.3], [0.25, 1.0, 0.0]]
    refs = _diffusers_unet(tiny_folder, [(lora_files[n], n) for n in adapters], unet_inputs, weights)
    errs = [rel_err(run(adapters, dict(zip(adapters, w))), ref) for w, ref in zip(weights, refs)]
    print("\n[a + kohya + b mixed] rel err: " + ", ".join(f"{e:.1e}" for e in errs))
    assert max(errs) <= TOL


@pytest.mark.parity
def test_saved_lora_loads_in_diffusers(lora_files, sdjax_unet, tiny_folder, unet_inputs, tmp_path):
    """save_lora (what training writes): diffusers' load_lora_weights applies the same alphas and ranks."""
    params, run = sdjax_unet
    adapter = load_lora(lora_files["kohya"], params)
    save_lora(tmp_path / "saved", adapter)
    (ref,) = _diffusers_unet(tiny_folder, [(tmp_path / "saved", "saved")], unet_inputs, [[0.8]])
    err = rel_err(run({"k": adapter}, {"k": 0.8}), ref)
    print(f"\n[saved by sdjax, loaded by diffusers] rel err {err:.1e}")
    assert err <= TOL


# ---------------------------------------------------------------------------------------------- parity: text encoder
@pytest.mark.parity
@pytest.mark.parametrize("fmt", ["peft", "kohya"])
def test_text_encoder_lora_matches_hand_reference(fmt, tiny_folder):
    """Hand-computed reference: transformers' CLIPTextModel with W + scale * alpha/rank * up @ down per layer."""
    import torch
    import transformers

    text, te_params = CLIPTextModel.from_pretrained(tiny_folder, subfolder="text_encoder")
    params = {"text_encoder": te_params}
    names = [f"encoder.layers.{i}.{m}" for i in range(TEXT["num_hidden_layers"]) for m in TEXT_TARGETS]
    state = peft_state(params, "text_encoder", names, rank=4, seed=3, prefix="text_model.")
    if fmt == "kohya":
        state = to_kohya(state, alpha_of=lambda m, a: 3.0)
        alpha = 3.0
        adapter = load_lora(state, params)
    else:
        alpha = 8.0  # from the LoraConfig metadata, matched to transformers 5's module names (no text_model.)
        adapter = load_lora(state, params, metadata={"text_encoder.r": 4, "text_encoder.lora_alpha": 8})
    ref_model = transformers.CLIPTextModel.from_pretrained(tiny_folder / "text_encoder").eval()
    ids = np.array([[0, 5, 9, 13, 2] + [1] * 4, [0, 7, 2] + [1] * 6])
    ids[ids == 0] = ref_model.config.bos_token_id
    ids[ids == 2] = ref_model.config.eos_token_id
    base = {k: v.clone() for k, v in ref_model.state_dict().items()}
    fn = jax.jit(lambda p, a, s: text.apply({"params": merge_lora(p, {"t": a}, {"t": s})["text_encoder"]}, ids))
    errs = []
    for scale in (0.0, 0.5, 1.0):
        sd = dict(base)
        for n in names:
            if fmt == "kohya":
                k = "lora_te_text_model_" + n.replace(".", "_")
                down, up = state[f"{k}.lora_down.weight"], state[f"{k}.lora_up.weight"]
            else:
                down, up = state[f"text_encoder.text_model.{n}.lora_A.weight"], state[f"text_encoder.text_model.{n}.lora_B.weight"]
            key = next(k for k in sd if k.endswith(f"{n}.weight"))
            sd[key] = base[key] + scale * alpha / 4 * torch.from_numpy(up @ down)
        ref_model.load_state_dict(sd)
        with torch.no_grad():
            ref = ref_model(torch.from_numpy(ids))
        out = fn(params, adapter, scale)
        errs.append(max(rel_err(out.last_hidden_state, ref.last_hidden_state.numpy()),
                        rel_err(out.pooler_output, ref.pooler_output.numpy())))
    print(f"\n[text encoder, {fmt}] rel err at scales 0, 0.5, 1: " + ", ".join(f"{e:.1e}" for e in errs))
    assert max(errs) <= TOL


# ---------------------------------------------------------------------------------------------- parity: textual inversion
@pytest.mark.parity
@pytest.mark.parametrize("fmt", ["diffusers-single", "diffusers-multi", "a1111-safetensors", "a1111-pt"])
def test_textual_inversion_matches_diffusers(fmt, tiny_folder, tmp_path):
    import torch
    from diffusers import StableDiffusionPipeline

    from sdjax.textual_inversion import load_textual_inversion, maybe_convert_prompt
    from sdjax.tokenizer import load_tokenizer

    rng = np.random.default_rng(1)
    n_vec = 1 if fmt == "diffusers-single" else 3
    emb = rng.standard_normal((n_vec, TEXT["hidden_size"])).astype(np.float32)
    token = "<cat-toy>"
    if fmt.startswith("diffusers"):
        path = tmp_path / "learned_embeds.safetensors"
        write_safetensors(path, {token: emb[0] if n_vec == 1 else emb})
        kw, ref_arg = {}, tmp_path
    elif fmt == "a1111-safetensors":
        path = tmp_path / "cat-toy.safetensors"
        write_safetensors(path, {"emb_params": emb})
        kw, ref_arg = {"token": token}, path
    else:
        path = tmp_path / "cat-toy.pt"
        torch.save({"string_to_param": {"*": torch.from_numpy(emb)}, "name": token, "step": 100}, path)
        kw, ref_arg = {"allow_pickle": True}, path
    pipe = StableDiffusionPipeline.from_pretrained(tiny_folder, safety_checker=None)
    pipe.load_textual_inversion(str(ref_arg), token=kw.get("token"))
    prompt = f"a photo of {token} on the moon"
    ref_prompt = pipe.maybe_convert_prompt(prompt, pipe.tokenizer)
    ref_ids = pipe.tokenizer(ref_prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = pipe.text_encoder(ref_ids)[0].numpy()

    tokenizer = load_tokenizer(tiny_folder)
    text, te_params = CLIPTextModel.from_pretrained(tiny_folder, subfolder="text_encoder")
    ti = load_textual_inversion(path if fmt.startswith("a1111") else tmp_path, tokenizer, te_params, **kw)
    assert ti.vocab_size == pipe.text_encoder.get_input_embeddings().weight.shape[0]
    ours_prompt = maybe_convert_prompt(prompt, tokenizer)
    assert ours_prompt == ref_prompt
    ids = tokenizer(ours_prompt, padding="max_length", max_length=77, return_tensors="np").input_ids
    np.testing.assert_array_equal(ids, ref_ids.numpy())
    out = text.clone(vocab_size=ti.vocab_size).apply({"params": ti.params}, ids).last_hidden_state
    err = rel_err(out, ref)
    print(f"\n[textual inversion {fmt}] rel err {err:.1e}")
    assert err <= TOL
