"""SDXL's UNet: parity with diffusers' PyTorch UNet2DConditionModel on tiny SDXL-style configs (text_time addition
embedding, per-block transformer depths and head counts, linear projections, DownBlock2D at the top), the
save_pretrained round trip, the added_cond_kwargs errors, and the real SDXL base/refiner configs' parameters."""

import functools
import math

import numpy as np
import pytest

import jax

torch = pytest.importorskip("torch", reason="the PyTorch reference is a test extra: pip install torch==2.13.0 && pip install -e '.[test]'")
diffusers = pytest.importorskip("diffusers", reason="the PyTorch reference is a test extra: pip install torch==2.13.0 && pip install -e '.[test]'")

from sdjax.errors import ConfigError
from sdjax.models.unet_2d_condition import UNet2DConditionModel
from sdjax.testing import perturb_, rel_err, torch_named_shapes

pytestmark = pytest.mark.parity  # every test here compares with the PyTorch reference

# Measured max rel err over both configs: 8e-7 .. 1e-6 (fp32, XLA:CPU vs torch CPU).
FP32_TOL = 1e-5
TEXT_LEN = 5

# Each: (diffusers config, sample H=W, timesteps, time_ids per sample, text_embeds width).
CONFIGS = {
    # SDXL base-like: no attention at the top level, transformer depth per block (1, 1, 2; the mid block
    # takes the last), head counts per block (head dims 8, 8, 4), linear proj_in/out, 6 time ids
    # (original size, crop top-left, target size), upcast_attention null as in the real config.
    "sdxl_base_like": (dict(
        block_out_channels=(16, 32, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=2,
        transformer_layers_per_block=[1, 1, 2], attention_head_dim=[2, 4, 8], use_linear_projection=True,
        cross_attention_dim=24, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=12 + 6 * 8, norm_num_groups=8, upcast_attention=None, sample_size=8,
    ), 8, [10, 999], [[32, 32, 0, 0, 32, 32], [48, 24, 4, 8, 32, 32]], 12),
    # SDXL refiner-like: DownBlock2D at both ends, one transformer depth (an int) for all blocks, 5 time ids
    # (original size, crop, aesthetic score), an odd size (10 -> 5 -> 3 -> 2, the up path targets the skips'
    # sizes), float timesteps.
    "sdxl_refiner_like": (dict(
        block_out_channels=(16, 16, 32, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
        transformer_layers_per_block=2, attention_head_dim=[2, 2, 4, 4], use_linear_projection=True,
        cross_attention_dim=16, addition_embed_type="text_time", addition_time_embed_dim=6,
        projection_class_embeddings_input_dim=16 + 5 * 6, norm_num_groups=8, sample_size=10,
    ), 10, [3.5, 500.25], [[40, 40, 0, 0, 6.0], [20, 30, 2, 2, 2.5]], 16),
}


def _inputs(name, seed=0):
    cfg, size, t, time_ids, text_width = CONFIGS[name]
    rng = np.random.default_rng(seed)
    return dict(
        sample=rng.standard_normal((2, cfg.get("in_channels", 4), size, size)).astype(np.float32),
        t=np.asarray(t), text=rng.standard_normal((2, TEXT_LEN, cfg["cross_attention_dim"])).astype(np.float32),
        added={"text_embeds": rng.standard_normal((2, text_width)).astype(np.float32),
               "time_ids": np.asarray(time_ids, np.float32)})


def _torch_out(model, x):
    added = {k: torch.from_numpy(v) for k, v in x["added"].items()}
    with torch.no_grad():
        return model(torch.from_numpy(x["sample"]), torch.from_numpy(x["t"]), torch.from_numpy(x["text"]),
                     added_cond_kwargs=added).sample.numpy()


@functools.partial(jax.jit, static_argnums=0)  # one program per UNet config (modules hash by value)
def _apply(unet, params, sample, t, text, added):
    return unet.apply({"params": params}, sample, t, text, added_cond_kwargs=added)


def _run(unet, params, x):
    return np.asarray(_apply(unet, params, x["sample"], x["t"], x["text"], x["added"]))


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """name -> (folder saved by diffusers, inputs, fp32 torch output). Perturbed random UNets, built once."""
    out = {}
    for name, (cfg, *_) in CONFIGS.items():
        torch.manual_seed(0)
        model = perturb_(diffusers.UNet2DConditionModel(**cfg).eval(), seed=1)
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder, safe_serialization=True)
        x = _inputs(name)
        out[name] = (folder, x, _torch_out(model, x))
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fp32_parity(references, name):
    folder, x, expected = references[name]
    unet, params = UNet2DConditionModel.from_pretrained(folder)
    assert unet.addition_embed_type == "text_time"
    assert set(params["add_embedding"]) == {"linear_1", "linear_2"}
    out = _run(unet, params, x)
    err = rel_err(out, expected)
    print(f"\n{name}: fp32 rel err {err:.2e}")
    assert out.shape == expected.shape
    assert err <= FP32_TOL
    # the size/crop conditioning reaches the output (same program: no recompilation)
    other = dict(x, added=dict(x["added"], time_ids=x["added"]["time_ids"] * 2))
    assert rel_err(_run(unet, params, other), expected) > 1e-3


def test_save_pretrained_round_trip(tmp_path):
    """sdjax params -> save_pretrained -> diffusers PyTorch from_pretrained -> same outputs."""
    name = "sdxl_base_like"
    unet = UNet2DConditionModel.from_config(CONFIGS[name][0])
    rng = np.random.default_rng(0)

    def fill(path, shape):  # fan-in scaled kernels, no zero biases or unit scales
        leaf = path[-1].key
        if leaf == "kernel":
            return (rng.standard_normal(shape.shape) / np.sqrt(np.prod(shape.shape[:-1]))).astype(np.float32)
        return ((leaf == "scale") + 0.05 * rng.standard_normal(shape.shape)).astype(np.float32)

    params = jax.tree_util.tree_map_with_path(fill, unet.param_shapes())
    unet.save_pretrained(tmp_path, params)
    model, info = diffusers.UNet2DConditionModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    x = _inputs(name, seed=3)
    err = rel_err(_run(unet, params, x), _torch_out(model.eval(), x))
    print(f"\nround trip: fp32 rel err {err:.2e}")
    assert err <= FP32_TOL
    assert UNet2DConditionModel.from_pretrained(tmp_path)[0].config == unet.config


def test_added_cond_kwargs_errors():
    cfg = CONFIGS["sdxl_base_like"][0]
    unet = UNet2DConditionModel.from_config(cfg)
    shapes = unet.param_shapes()
    x = _inputs("sdxl_base_like")

    def call(*args, **kwargs):
        return jax.eval_shape(lambda p: unet.apply({"params": p}, x["sample"], x["t"], x["text"], *args, **kwargs),
                              shapes)

    assert call(added_cond_kwargs=x["added"]).shape == x["sample"].shape
    with pytest.raises(ConfigError, match=r"'text_time'.*needs added_cond_kwargs=.*missing: 'text_embeds', 'time_ids'"):
        call()
    with pytest.raises(ConfigError, match=r"missing: 'time_ids'"):
        call({"text_embeds": x["added"]["text_embeds"]})
    with pytest.raises(ConfigError, match=r"width 52 .*projection_class_embeddings_input_dim = 60"):
        call({"text_embeds": x["added"]["text_embeds"], "time_ids": x["added"]["time_ids"][:, :5]})
    with pytest.raises(ConfigError, match=r"for a batch of 2"):
        call({"text_embeds": x["added"]["text_embeds"][:1], "time_ids": x["added"]["time_ids"][:1]})
    # a text_time config without its widths is refused on construction, naming the key
    for key in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
        with pytest.raises(ConfigError, match=f"'text_time' needs config key '{key}'"):
            UNet2DConditionModel.from_config(dict(cfg, **{key: None}))


def test_non_sdxl_unet_ignores_added_cond_kwargs():
    """As in diffusers: added_cond_kwargs is read only by the addition embedding that needs it."""
    cfg = dict(CONFIGS["sdxl_base_like"][0], addition_embed_type=None)
    unet = UNet2DConditionModel.from_config(cfg)
    assert "add_embedding" not in unet.param_shapes()
    x = _inputs("sdxl_base_like")
    shapes = unet.param_shapes()
    # the same program with and without them (the arrays are closed over: unused ones leave no trace)
    without = jax.make_jaxpr(lambda p: unet.apply({"params": p}, x["sample"], x["t"], x["text"]))(shapes)
    with_them = jax.make_jaxpr(lambda p: unet.apply({"params": p}, x["sample"], x["t"], x["text"],
                                                    added_cond_kwargs=x["added"]))(shapes)
    assert str(with_them) == str(without)


# ---------------------------------------------------------------------- the real SDXL configs

# stabilityai/stable-diffusion-xl-base-1.0/unet/config.json (without _class_name / _diffusers_version).
SDXL_BASE_UNET_CONFIG = {
    "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
    "center_input_sample": False, "class_embed_type": None, "class_embeddings_concat": False, "conv_in_kernel": 3,
    "conv_out_kernel": 3, "cross_attention_dim": 2048, "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "downsample_padding": 1,
    "dual_cross_attention": False, "encoder_hid_dim": None, "encoder_hid_dim_type": None, "flip_sin_to_cos": True,
    "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05,
    "norm_num_groups": 32, "num_attention_heads": None, "num_class_embeds": None, "only_cross_attention": False,
    "out_channels": 4, "projection_class_embeddings_input_dim": 2816, "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False, "resnet_time_scale_shift": "default", "sample_size": 128,
    "time_cond_proj_dim": None, "time_embedding_act_fn": None, "time_embedding_dim": None,
    "time_embedding_type": "positional", "timestep_post_act": None, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "upcast_attention": None,
    "use_linear_projection": True,
}
# stabilityai/stable-diffusion-xl-refiner-1.0/unet/config.json: the same keys with these values.
SDXL_REFINER_UNET_CONFIG = SDXL_BASE_UNET_CONFIG | {
    "attention_head_dim": [6, 12, 24, 24], "block_out_channels": [384, 768, 1536, 1536], "cross_attention_dim": 1280,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "projection_class_embeddings_input_dim": 2560, "transformer_layers_per_block": 4,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
}


@pytest.mark.parametrize("config", [SDXL_BASE_UNET_CONFIG, SDXL_REFINER_UNET_CONFIG], ids=["base", "refiner"])
def test_real_sdxl_configs_have_diffusers_parameters(config):
    """Every parameter name and shape of the real SDXL UNets equals diffusers' (torch on the meta device and
    jax.eval_shape: nothing is allocated), hence the counts too."""
    with torch.device("meta"):
        reference = diffusers.UNet2DConditionModel.from_config(config)
    expected = {k: tuple(p.shape) for k, p in reference.named_parameters()}
    unet = UNet2DConditionModel.from_config(config)
    shapes = unet.param_shapes()
    ours = torch_named_shapes(shapes)
    n_ours = sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes))
    n_expected = sum(p.numel() for p in reference.parameters())
    print(f"\nSDXL UNet parameters: sdjax {n_ours:,}, diffusers {n_expected:,}")
    assert sorted(set(ours) ^ set(expected)) == []
    assert {k for k in ours if ours[k] != expected[k]} == set()
    assert n_ours == n_expected
    assert ours["add_embedding.linear_1.weight"] == (1280 if config["block_out_channels"][0] == 320 else 1536,
                                                     config["projection_class_embeddings_input_dim"])
