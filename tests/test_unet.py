"""UNet2DConditionModel parity with diffusers' PyTorch UNet2DConditionModel (small random configs)."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

torch = pytest.importorskip("torch", reason="the PyTorch reference is a test extra: pip install torch==2.13.0 && pip install -e '.[test]'")
diffusers = pytest.importorskip("diffusers", reason="the PyTorch reference is a test extra: pip install torch==2.13.0 && pip install -e '.[test]'")

from sdjax.errors import ConfigError
from sdjax.models.attention import ATTENTION_PROBS
from sdjax.models.unet_2d_condition import UNet2DConditionModel
from sdjax.testing import perturb_, rel_err

pytestmark = pytest.mark.parity  # every test here compares with the PyTorch reference

# Tiny configs covering the SD 1.x / 2.x switches. Each: (diffusers config, sample H=W, timesteps).
CONFIGS = {
    # SD 1.x-like: conv proj_in/out, one head count for all blocks, int timesteps.
    "sd1_like": (dict(
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, norm_num_groups=8,
        cross_attention_dim=16, attention_head_dim=2, sample_size=8,
    ), 8, [10, 999]),
    # SD 2.x-like: linear proj, per-block head counts, upcast attention; 3 levels at an odd size (10 -> 5 -> 3,
    # so the up path must upsample 3 -> 5), float timesteps.
    "sd2_like_odd_size": (dict(
        block_out_channels=(16, 32, 32),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=2,
        norm_num_groups=8, cross_attention_dim=12, attention_head_dim=(2, 4, 4), use_linear_projection=True,
        upcast_attention=True, sample_size=10,
    ), 10, [3.5, 500.25]),
    # The less common knobs: groups=32, all-attention blocks, 2 transformer layers, mid scale, shifted
    # non-flipped sinusoids, centred input, 1x1 conv_in, explicit time_embedding_dim, in != out channels.
    "misc_options": (dict(
        block_out_channels=(32, 32), down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, norm_num_groups=32,
        cross_attention_dim=8, attention_head_dim=4, transformer_layers_per_block=2, mid_block_scale_factor=2.0,
        flip_sin_to_cos=False, freq_shift=1, center_input_sample=True, conv_in_kernel=1, time_embedding_dim=48,
        in_channels=3, out_channels=5, norm_eps=1e-6, sample_size=8,
    ), 8, 7),  # a scalar timestep, broadcast over the batch
}
TEXT_LEN = 5


def _inputs(cfg, size, seed=0):
    rng = np.random.default_rng(seed)
    sample = rng.standard_normal((2, cfg.get("in_channels", 4), size, size)).astype(np.float32)
    text = rng.standard_normal((2, TEXT_LEN, cfg["cross_attention_dim"])).astype(np.float32)
    return sample, text


def _torch_out(model, sample, t, text):
    t = torch.tensor(t)
    with torch.no_grad():
        return model(torch.from_numpy(sample), t, torch.from_numpy(text)).sample.numpy()


_REFERENCES = {}


def _reference(name, tmp_path_factory):
    """A perturbed random diffusers UNet saved as safetensors, with inputs and its fp32 output (built once)."""
    if name not in _REFERENCES:
        cfg, size, t = CONFIGS[name]
        torch.manual_seed(0)
        model = perturb_(diffusers.UNet2DConditionModel(**cfg).eval(), seed=1)
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder, safe_serialization=True)
        sample, text = _inputs(cfg, size)
        _REFERENCES[name] = dict(name=name, folder=folder, sample=sample, text=text, t=t,
                                 expected=_torch_out(model, sample, t, text), cfg=cfg)
    return _REFERENCES[name]


def _run(unet, params, ref, dtype=jnp.float32):
    fn = jax.jit(lambda p, x, t, c: unet.apply({"params": p}, x, t, c))
    return np.asarray(fn(params, jnp.asarray(ref["sample"], dtype), jnp.asarray(ref["t"]),
                         jnp.asarray(ref["text"], dtype)), np.float32)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fp32_parity(name, tmp_path_factory):
    reference = _reference(name, tmp_path_factory)
    unet, params = UNet2DConditionModel.from_pretrained(reference["folder"])
    out = _run(unet, params, reference)
    err = rel_err(out, reference["expected"])
    print(f"\n{reference['name']}: fp32 rel err {err:.2e}")
    assert out.shape == reference["expected"].shape
    assert err <= 1e-4


# bf16 params and compute vs the fp32 torch reference. Measured max rel err over these 3 configs x 4 seeds:
# 1.2e-2 .. 2.2e-2 (bf16 keeps 8 mantissa bits, ~2e-3 per rounding, over ~20 layers); the same with fp32
# params and bf16 compute. The bound leaves room for other seeds and XLA versions.
BF16_BOUND = 4e-2


# misc_options (measured 1.2e-2) is left out to keep the suite fast: bf16 adds nothing config-specific there.
@pytest.mark.parametrize("name", ["sd1_like", "sd2_like_odd_size"])
def test_bf16_close(name, tmp_path_factory):
    reference = _reference(name, tmp_path_factory)
    unet, params = UNet2DConditionModel.from_pretrained(reference["folder"], dtype=jnp.bfloat16)
    assert all(p.dtype == jnp.bfloat16 for p in jax.tree_util.tree_leaves(params))
    out = _run(unet, params, reference, jnp.bfloat16)
    err = rel_err(out, reference["expected"])
    print(f"\n{reference['name']}: bf16 rel err {err:.2e}")
    assert err <= BF16_BOUND


def _random_params(unet, seed=0):
    """Random params of the right shapes, with no zero biases or unit scales (so a transposed or misnamed
    tensor shows). Numpy instead of `unet.init_weights`: compiling Flax's init costs ~15 s on 2 cores."""
    rng = np.random.default_rng(seed)

    def fill(path, shape):
        leaf = path[-1].key
        if leaf == "kernel":  # fan-in scaled, so activations keep their size through the network
            return (rng.standard_normal(shape.shape) / np.sqrt(np.prod(shape.shape[:-1]))).astype(np.float32)
        base = 1.0 if leaf == "scale" else 0.0
        return (base + 0.05 * rng.standard_normal(shape.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, unet.param_shapes())


def test_save_pretrained_round_trip(tmp_path):
    """sdjax params -> save_pretrained -> diffusers PyTorch from_pretrained -> same outputs."""
    cfg, size, t = CONFIGS["sd2_like_odd_size"]
    unet = UNet2DConditionModel.from_config(cfg)
    params = _random_params(unet)
    unet.save_pretrained(tmp_path, params)

    model = diffusers.UNet2DConditionModel.from_pretrained(tmp_path).eval()
    sample, text = _inputs(cfg, size, seed=3)
    expected = _torch_out(model, sample, t, text)
    out = _run(unet, params, dict(sample=sample, t=t, text=text))
    assert rel_err(out, expected) <= 1e-4


def test_legacy_flax_msgpack(tmp_path):
    """Old diffusers Flax UNets (diffusion_flax_model.msgpack) call attention projections query/key/value/proj_attn."""
    import json
    from flax.serialization import msgpack_serialize
    from flax.traverse_util import flatten_dict, unflatten_dict

    unet = UNet2DConditionModel.from_config(CONFIGS["sd1_like"][0])
    params = _random_params(unet)
    legacy_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out_0": "proj_attn"}
    legacy = unflatten_dict({tuple(legacy_names.get(k, k) for k in path): np.asarray(v)
                             for path, v in flatten_dict(params).items()})
    (tmp_path / "diffusion_flax_model.msgpack").write_bytes(msgpack_serialize(legacy))
    (tmp_path / "config.json").write_text(json.dumps(unet.to_json_config()))

    _, loaded = UNet2DConditionModel.from_pretrained(tmp_path)
    flat, flat_loaded = flatten_dict(params), flatten_dict(loaded)
    assert flat.keys() == flat_loaded.keys()
    for k in flat:
        np.testing.assert_array_equal(np.asarray(flat_loaded[k]), flat[k])


def test_attention_probs_sown_only_when_asked():
    cfg, size, t = CONFIGS["sd1_like"]
    unet = UNet2DConditionModel.from_config(cfg)
    sample, text = _inputs(cfg, size)
    params = _random_params(unet)
    t = jnp.asarray(t)

    plain = jax.jit(lambda p: unet.apply({"params": p}, sample, t, text))(params)
    assert isinstance(plain, jax.Array)  # no collection asked for: just the array

    out, state = jax.jit(lambda p: unet.apply({"params": p}, sample, t, text, mutable=[ATTENTION_PROBS]))(params)
    np.testing.assert_allclose(np.asarray(out), np.asarray(plain), rtol=1e-5, atol=1e-5)
    flat = jax.tree_util.tree_flatten_with_path(state[ATTENTION_PROBS])[0]
    paths = ["/".join(str(getattr(k, "key", k)) for k in path) for path, _ in flat]
    # sd1_like has one transformer in down_blocks_0, one in the mid block, two in up_blocks_1: 4 cross-attentions.
    assert len(flat) == 4, paths
    assert all("attn2" in p for p in paths) and not any("attn1" in p for p in paths)
    for _, probs in flat:
        assert probs.shape[0] == 2 and probs.shape[-1] == TEXT_LEN  # [B, H*W, text tokens], head-averaged
        np.testing.assert_allclose(np.asarray(probs).sum(-1), 1.0, rtol=1e-5)


def test_unsupported_configs_are_refused():
    # SDXL's "text_time" is implemented (tests/test_unet_sdxl.py); the other addition embeddings are not.
    cfg = dict(CONFIGS["sd1_like"][0], addition_embed_type="text_image", addition_time_embed_dim=256,
               projection_class_embeddings_input_dim=2816)
    with pytest.raises(ConfigError, match="addition_embed_type"):
        UNet2DConditionModel.from_config(cfg)
    # Per-block lists are checked on construction too (nested lists: asymmetric UNets such as SSD-1B).
    with pytest.raises(ConfigError, match="transformer_layers_per_block"):
        UNet2DConditionModel.from_config(dict(CONFIGS["sd1_like"][0], transformer_layers_per_block=[[1, 2], [1, 2]]))
    with pytest.raises(ConfigError, match="down_block_types"):
        UNet2DConditionModel.from_config(dict(CONFIGS["sd1_like"][0],
                                              down_block_types=["SimpleCrossAttnDownBlock2D", "DownBlock2D"]))


def test_config_round_trips():
    cfg = CONFIGS["sd2_like_odd_size"][0]
    unet = UNet2DConditionModel.from_config(cfg)
    again = UNet2DConditionModel.from_config(unet.to_json_config())
    assert again.config == unet.config
    for k, v in cfg.items():
        assert unet.config[k] == v


@pytest.mark.parametrize("side,stride,pad", [(2, 1, (1, 1)), (4, 2, (1, 1)), (5, 2, (0, 1)), (8, 1, (1, 1))])
def test_small_conv_matmul_path_equals_xla_conv(side, stride, pad):
    """Small-output convs as one matmul over patches (conv_kernel="matmul", and "auto" on CPU); same numbers."""
    from jax import lax

    from sdjax.models import resnet

    matmul, auto = resnet.CONV_FUNCTIONS["matmul"], resnet.CONV_FUNCTIONS["auto"]
    rng = np.random.default_rng(side)
    x = jnp.asarray(rng.standard_normal((2, side, side, 24)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((3, 3, 24, 16)), jnp.float32)
    args = ((stride, stride), (pad, pad))
    dn = ("NHWC", "HWIO", "NHWC")
    ref = lax.conv_general_dilated(x, k, *args, dimension_numbers=dn)
    for conv in (matmul, auto):
        ours = conv(x, k, *args, dimension_numbers=dn)
        assert ours.shape == ref.shape
        assert rel_err(np.asarray(ours), np.asarray(ref)) < 1e-6
    assert "conv_general_dilated" not in str(jax.make_jaxpr(lambda x, k: matmul(x, k, *args, dimension_numbers=dn))(x, k))
    # "auto" is decided for the platform the program is compiled for: no convolution in a CPU program
    lowered = jax.jit(lambda x, k: auto(x, k, *args, dimension_numbers=dn)).lower(x, k).as_text()
    assert ("convolution" in lowered) == (jax.default_backend() != "cpu")
    # gradients agree too (the toy LDM trains through this path)
    g = jax.grad(lambda k: matmul(x, k, *args, dimension_numbers=dn).sum())(k)
    g_ref = jax.grad(lambda k: lax.conv_general_dilated(x, k, *args, dimension_numbers=dn).sum())(k)
    assert rel_err(np.asarray(g), np.asarray(g_ref)) < 1e-6
    # large outputs keep XLA's convolution
    big = jnp.zeros((1, 16, 16, 24), jnp.float32)
    assert "conv_general_dilated" in str(jax.make_jaxpr(
        lambda x: matmul(x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn))(big))


@pytest.mark.parametrize("attention_kernel", ["auto", "einsum", "xla"])
@pytest.mark.parametrize("conv_kernel", ["auto", "xla", "matmul"])
def test_kernel_choices_give_the_same_numbers(attention_kernel, conv_kernel):
    """Every attention and conv implementation, forced through the module fields, against einsum + XLA conv."""
    unet = UNet2DConditionModel(**CONFIGS["sd1_like"][0])
    params = unet.init_weights(jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 16, 16))
    ctx = jax.random.normal(jax.random.PRNGKey(2), (2, 7, unet.cross_attention_dim))
    ref = unet.clone(attention_kernel="einsum", conv_kernel="xla").apply({"params": params}, x, 10, ctx)
    out = unet.clone(attention_kernel=attention_kernel, conv_kernel=conv_kernel).apply({"params": params}, x, 10, ctx)
    assert rel_err(np.asarray(out), np.asarray(ref)) < 2e-6
    with pytest.raises(ConfigError, match="attention_kernel = 'flash'"):
        UNet2DConditionModel(**CONFIGS["sd1_like"][0], attention_kernel="flash")
