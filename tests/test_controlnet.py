"""ControlNetModel and the UNet's ControlNet residuals, against diffusers' PyTorch ControlNetModel / UNet (fp32, CPU,
small random configs with perturbed weights)."""

import functools

import numpy as np
import pytest

import jax
import jax.numpy as jnp

try:
    import diffusers
    import torch
except ImportError:  # the tests marked parity skip (tests/conftest.py); the others need no reference
    diffusers = torch = None

from sdjax import convert
from sdjax.errors import ConfigError, WeightsError
from sdjax.models import ControlNetModel, ControlNetOutput, check_compatible
from sdjax.models.unet_2d_condition import UNet2DConditionModel
from sdjax.testing import perturb_, rel_err

# Every residual within this relative error of diffusers' (max |a - b| / max |b|, per residual).
RESIDUAL_BOUND = 1e-5
SCALE = 0.7  # conditioning_scale != 1, passed traced
TEXT_LEN = 5

# Tiny ControlNet configs covering the SD 1.x / 2.x switches. Each: (diffusers config, latent H=W, timesteps).
CONFIGS = {
    # SD 1.x-like: conv proj_in/out, one head count; a 2-step conditioning embedding (image 2x the latents).
    "sd1_like": (dict(
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), layers_per_block=1,
        norm_num_groups=8, cross_attention_dim=16, attention_head_dim=2, conditioning_embedding_out_channels=(8, 16),
    ), 8, [10, 999]),
    # SD 2.x-like: linear proj, per-block head counts, upcast attention, 3 levels at an odd latent size (5 -> 3 -> 2),
    # float timesteps; SD's 4-step conditioning embedding (image 8x the latents) in BGR order.
    "sd2_like": (dict(
        block_out_channels=(16, 32, 32),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"), layers_per_block=2,
        norm_num_groups=8, cross_attention_dim=12, attention_head_dim=(2, 4, 4), use_linear_projection=True,
        upcast_attention=True, conditioning_embedding_out_channels=(4, 8, 8, 16),
        controlnet_conditioning_channel_order="bgr",
    ), 5, [3.5, 500.25]),
    # ControlNet-shuffle's switch: residuals averaged over H, W; a 1-channel control image.
    "global_pool": (dict(
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), layers_per_block=1,
        norm_num_groups=8, cross_attention_dim=16, attention_head_dim=2, conditioning_embedding_out_channels=(8, 16),
        global_pool_conditions=True, conditioning_channels=1,
    ), 8, 7),
}
UNET = dict(  # fits CONFIGS["sd1_like"]
    block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, norm_num_groups=8,
    cross_attention_dim=16, attention_head_dim=2, sample_size=8,
)


def _inputs(cfg, size, seed=0):
    rng = np.random.default_rng(seed)
    factor = 2 ** (len(cfg["conditioning_embedding_out_channels"]) - 1)
    sample = rng.standard_normal((2, cfg.get("in_channels", 4), size, size)).astype(np.float32)
    text = rng.standard_normal((2, TEXT_LEN, cfg["cross_attention_dim"])).astype(np.float32)
    image = rng.uniform(0, 1, (2, cfg.get("conditioning_channels", 3), size * factor, size * factor)).astype(np.float32)
    return sample, text, image


def _torch_residuals(model, sample, t, text, image, scale=1.0, guess_mode=False):
    with torch.no_grad():
        out = model(torch.from_numpy(sample), torch.tensor(t), torch.from_numpy(text), torch.from_numpy(image),
                    conditioning_scale=scale, guess_mode=guess_mode)
    return [r.numpy() for r in out.down_block_res_samples], out.mid_block_res_sample.numpy()


# One compiled program per (module, guess_mode) for the whole file: the scale is traced, params are arguments.
@functools.partial(jax.jit, static_argnames=("module", "guess_mode"))
def _residuals(module, params, sample, t, text, image, scale, guess_mode=False):
    out = module.apply({"params": params}, sample, t, text, image, conditioning_scale=scale, guess_mode=guess_mode)
    return out.down_block_res_samples, out.mid_block_res_sample


def _errors(ours, expected):
    """Relative error of every residual (down ones, then mid)."""
    (down, mid), (exp_down, exp_mid) = ours, expected
    assert len(down) == len(exp_down)
    errs = []
    for a, b in zip([*down, mid], [*exp_down, exp_mid]):
        assert a.shape == b.shape
        errs.append(rel_err(np.asarray(a), b))
    return errs


_REFERENCES = {}


def _reference(name, tmp_path_factory):
    """A perturbed random diffusers ControlNet saved as safetensors, loaded by sdjax (built once per config)."""
    if name not in _REFERENCES:
        cfg, size, t = CONFIGS[name]
        torch.manual_seed(0)
        model = perturb_(diffusers.ControlNetModel(**cfg).eval(), seed=1)  # also moves the zero convs off zero
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder, safe_serialization=True)
        controlnet, params = ControlNetModel.from_pretrained(folder)
        _REFERENCES[name] = dict(model=model, controlnet=controlnet, params=params, inputs=_inputs(cfg, size), t=t)
    return _REFERENCES[name]


@pytest.mark.parity
@pytest.mark.parametrize("guess_mode", [False, True], ids=["plain", "guess_mode"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_residuals_match_diffusers(name, guess_mode, tmp_path_factory):
    ref = _reference(name, tmp_path_factory)
    sample, text, image = ref["inputs"]
    expected = _torch_residuals(ref["model"], sample, ref["t"], text, image, SCALE, guess_mode)
    ours = _residuals(ref["controlnet"], ref["params"], sample, jnp.asarray(ref["t"]), text, image,
                      jnp.float32(SCALE), guess_mode=guess_mode)
    errs = _errors(ours, expected)
    print(f"\n{name} guess_mode={guess_mode} scale={SCALE}: max rel err {max(errs):.2e} over {len(errs)} residuals "
          f"({', '.join(f'{e:.1e}' for e in errs)})")
    assert max(errs) <= RESIDUAL_BOUND
    if name == "global_pool":
        assert all(r.shape[2:] == (1, 1) for r in [*ours[0], ours[1]])


@pytest.mark.parity
def test_output_struct_and_tuple(tmp_path_factory):
    ref = _reference("sd1_like", tmp_path_factory)
    sample, text, image = ref["inputs"]
    controlnet, params = ref["controlnet"], ref["params"]
    out = jax.eval_shape(lambda p: controlnet.apply({"params": p}, sample, 10, text, image), params)
    assert isinstance(out, ControlNetOutput)
    down, mid = jax.eval_shape(lambda p: controlnet.apply({"params": p}, sample, 10, text, image, return_dict=False),
                               params)
    assert isinstance(down, tuple) and len(down) == len(controlnet.skip_channels()) == 4
    assert [d.shape[1] for d in down] == list(controlnet.skip_channels()) and mid.shape == (2, 64, 4, 4)


# ------------------------------------------------------------------ the UNet with residuals
def _unet_reference(tmp_path_factory):
    if "unet" not in _REFERENCES:
        torch.manual_seed(0)
        model = perturb_(diffusers.UNet2DConditionModel(**UNET).eval(), seed=2)
        folder = tmp_path_factory.mktemp("unet")
        model.save_pretrained(folder, safe_serialization=True)
        unet, params = UNet2DConditionModel.from_pretrained(folder)
        _REFERENCES["unet"] = dict(model=model, folder=folder, unet=unet, params=params)
    return _REFERENCES["unet"]


@pytest.mark.parity
def test_unet_with_residuals_matches_diffusers(tmp_path_factory):
    """Residuals of the size of the features they are added to (not a ControlNet's small ones), one of them pooled
    to [B, C, 1, 1] as global_pool_conditions gives."""
    ref = _unet_reference(tmp_path_factory)
    rng = np.random.default_rng(5)
    sample = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    text = rng.standard_normal((2, TEXT_LEN, 16)).astype(np.float32)
    sizes = [8, 8, 4, 4]  # conv_in, down_blocks.0 resnet, its downsample, down_blocks.1 resnet
    down = [rng.standard_normal((2, c, s, s)).astype(np.float32)
            for c, s in zip(ref["unet"].skip_channels(), sizes)]
    down[1] = down[1].mean(axis=(2, 3), keepdims=True)
    mid = rng.standard_normal((2, 64, 4, 4)).astype(np.float32)
    t = [10, 999]
    with torch.no_grad():
        expected = ref["model"](torch.from_numpy(sample), torch.tensor(t), torch.from_numpy(text),
                                down_block_additional_residuals=tuple(torch.from_numpy(d) for d in down),
                                mid_block_additional_residual=torch.from_numpy(mid)).sample.numpy()
        plain = ref["model"](torch.from_numpy(sample), torch.tensor(t), torch.from_numpy(text)).sample.numpy()
    unet, params = ref["unet"], ref["params"]
    out = jax.jit(lambda p, d, m: unet.apply({"params": p}, sample, jnp.asarray(t), text,
                                             down_block_additional_residuals=d, mid_block_additional_residual=m)
                  )(params, down, mid)
    err = rel_err(np.asarray(out), expected)
    print(f"\nUNet + residuals: rel err {err:.2e} (the residuals change the output by "
          f"{rel_err(plain, expected):.2f} relative)")
    assert rel_err(plain, expected) > 0.1  # the residuals matter
    assert err <= RESIDUAL_BOUND


@pytest.mark.parity
def test_unet_residual_errors(tmp_path_factory):
    ref = _unet_reference(tmp_path_factory)
    unet, params = ref["unet"], ref["params"]
    sample, text = jnp.zeros((2, 4, 8, 8)), jnp.zeros((2, TEXT_LEN, 16))
    down = [jnp.zeros((2, c, s, s)) for c, s in zip(unet.skip_channels(), [8, 8, 4, 4])]
    mid = jnp.zeros((2, 64, 4, 4))

    def call(**kw):
        return jax.eval_shape(lambda p: unet.apply({"params": p}, sample, 1, text, **kw), params)

    assert call(down_block_additional_residuals=down, mid_block_additional_residual=mid).shape == sample.shape
    with pytest.raises(ConfigError, match="both down_block_additional_residuals and mid_block_additional_residual"):
        call(mid_block_additional_residual=mid)
    with pytest.raises(ConfigError, match="has 3 arrays, the UNet has 4 skips"):
        call(down_block_additional_residuals=down[:3], mid_block_additional_residual=mid)
    with pytest.raises(ConfigError, match=r"down_block_additional_residuals\[2\] has shape \(2, 64, 4, 4\), the "
                                          r"UNet's features there are \(2, 32, 4, 4\)"):
        call(down_block_additional_residuals=[*down[:2], down[3], down[3]], mid_block_additional_residual=mid)
    with pytest.raises(ConfigError, match="mid_block_additional_residual has shape"):
        call(down_block_additional_residuals=down, mid_block_additional_residual=jnp.zeros((2, 64, 8, 8)))


# ------------------------------------------------------------------ from_unet, save/load
@pytest.mark.parity
def test_from_unet_equals_diffusers(tmp_path_factory):
    ref = _unet_reference(tmp_path_factory)
    channels = (8, 16)
    controlnet, params = ControlNetModel.from_unet(ref["unet"], ref["params"],
                                                   conditioning_embedding_out_channels=channels)
    expected = diffusers.ControlNetModel.from_unet(ref["model"], conditioning_embedding_out_channels=channels)

    ours_cfg, theirs_cfg = controlnet.to_json_config(), dict(expected.config)
    for key in controlnet.config_fields():
        assert ours_cfg[key] == (list(theirs_cfg[key]) if isinstance(theirs_cfg[key], tuple) else theirs_cfg[key]), key
    check_compatible(controlnet, ref["unet"])

    ours = convert.flax_to_torch(params)
    theirs = {k: v.numpy() for k, v in expected.state_dict().items()}
    assert ours.keys() == theirs.keys()
    fresh = ("controlnet_cond_embedding.conv_in.", "controlnet_cond_embedding.blocks.")  # random init in both
    zero = ("controlnet_down_blocks.", "controlnet_mid_block.", "controlnet_cond_embedding.conv_out.")
    for key, value in ours.items():
        assert value.shape == theirs[key].shape, key
        if key.startswith(zero):
            assert not value.any() and not theirs[key].any(), key
        elif not key.startswith(fresh):  # copied from the UNet: the same numbers
            np.testing.assert_array_equal(value, theirs[key], err_msg=key)
            assert value.any(), key
    copied = [k for k in ours if not k.startswith(fresh + zero)]
    assert any(k.startswith("down_blocks.1.") for k in copied) and any(k.startswith("mid_block.") for k in copied)
    # new buffers, not the UNet's (donating one model's params must not delete the other's)
    for k in ("conv_in", "mid_block"):
        for a, b in zip(jax.tree_util.tree_leaves(params[k]), jax.tree_util.tree_leaves(ref["params"][k])):
            assert a.unsafe_buffer_pointer() != b.unsafe_buffer_pointer()

    # params of another UNet are refused, naming what does not fit
    other = UNet2DConditionModel(**dict(UNET, cross_attention_dim=8))
    with pytest.raises(WeightsError, match=r"unet_params do not match .*attn2/to_k/kernel: \(16, 64\) vs \(8, 64\)"):
        ControlNetModel.from_unet(other, ref["params"], conditioning_embedding_out_channels=channels)


@pytest.mark.parity
@pytest.mark.slow  # ~30 s: Flax's init of the whole model, un-jitted
def test_from_unet_without_weights():
    unet = UNet2DConditionModel(**UNET)
    controlnet, params = ControlNetModel.from_unet(unet, None, conditioning_embedding_out_channels=(8, 16),
                                                   load_weights_from_unet=False)
    flat = convert.flax_to_torch(params)
    assert flat.keys() == set(diffusers.ControlNetModel(**CONFIGS["sd1_like"][0]).state_dict())
    zero = ("controlnet_down_blocks.", "controlnet_mid_block.", "controlnet_cond_embedding.conv_out.")
    for key, value in flat.items():
        assert (not value.any()) == (key.startswith(zero) or key.endswith(".bias")), key


def test_from_unet_refuses_what_a_controlnet_cannot_copy():
    unet = UNet2DConditionModel(**UNET, conv_in_kernel=1)
    with pytest.raises(ConfigError, match="'conv_in_kernel' = 1"):
        ControlNetModel.from_unet(unet, {})
    unet = UNet2DConditionModel(**UNET, mid_block_type=None)
    with pytest.raises(ConfigError, match="ControlNetModel: config key 'mid_block_type' = None is not supported"):
        ControlNetModel.from_unet(unet, {"conv_in": {"kernel": np.zeros((3, 3, 4, 32), np.float32)}})


def _random_params(module, seed=0):
    """Random params of the right shapes, none zero (numpy: compiling Flax's init is slow on 2 cores)."""
    rng = np.random.default_rng(seed)

    def fill(path, shape):
        leaf = path[-1].key
        if leaf == "kernel":
            return (rng.standard_normal(shape.shape) / np.sqrt(np.prod(shape.shape[:-1]))).astype(np.float32)
        base = 1.0 if leaf == "scale" else 0.0
        return (base + 0.05 * rng.standard_normal(shape.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, module.param_shapes())


@pytest.mark.parity
def test_save_pretrained_loads_in_diffusers(tmp_path):
    """sdjax params -> save_pretrained -> diffusers PyTorch ControlNetModel.from_pretrained -> the same residuals."""
    cfg, size, t = CONFIGS["sd2_like"]
    controlnet = ControlNetModel.from_config(cfg)
    params = _random_params(controlnet)
    controlnet.save_pretrained(tmp_path, params)

    model = diffusers.ControlNetModel.from_pretrained(tmp_path).eval()
    sample, text, image = _inputs(cfg, size, seed=3)
    expected = _torch_residuals(model, sample, t, text, image, SCALE)
    ours = _residuals(controlnet, params, sample, jnp.asarray(t), text, image, jnp.float32(SCALE))
    errs = _errors(ours, expected)
    print(f"\nsaved by sdjax, run by diffusers: max rel err {max(errs):.2e}")
    assert max(errs) <= RESIDUAL_BOUND
    again, loaded = ControlNetModel.from_pretrained(tmp_path)
    assert again == controlnet
    for a, b in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_legacy_flax_msgpack(tmp_path):
    """diffusers' removed FlaxControlNetModel saved diffusion_flax_model.msgpack with the UNet's old attention
    names (query/key/value/proj_attn); everything else already had these names."""
    import json
    from flax.serialization import msgpack_serialize
    from flax.traverse_util import flatten_dict, unflatten_dict

    controlnet = ControlNetModel.from_config(CONFIGS["sd1_like"][0])
    params = _random_params(controlnet)
    legacy_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out_0": "proj_attn"}
    legacy = unflatten_dict({tuple(legacy_names.get(k, k) for k in path): np.asarray(v)
                             for path, v in flatten_dict(params).items()})
    (tmp_path / "diffusion_flax_model.msgpack").write_bytes(msgpack_serialize(legacy))
    (tmp_path / "config.json").write_text(json.dumps(controlnet.to_json_config()))
    _, loaded = ControlNetModel.from_pretrained(tmp_path)
    flat, flat_loaded = flatten_dict(params), flatten_dict(loaded)
    assert flat.keys() == flat_loaded.keys()
    for k in flat:
        np.testing.assert_array_equal(np.asarray(flat_loaded[k]), flat[k])


# ------------------------------------------------------------------ bad input
def test_check_compatible_names_both_models():
    unet = UNet2DConditionModel(**UNET)
    check_compatible(ControlNetModel(**CONFIGS["sd1_like"][0]), unet)
    with pytest.raises(ConfigError, match=r"cross_attention_dim 12 \(ControlNet\) vs 16 \(UNet\)"):
        check_compatible(ControlNetModel(**dict(CONFIGS["sd1_like"][0], cross_attention_dim=12)), unet)
    with pytest.raises(ConfigError, match=r"down-path layout: the ControlNet \(block_out_channels \(16, 32, 32\), "
                                          r"layers_per_block 2\) gives 9 residuals .* the UNet \(block_out_channels "
                                          r"\(32, 64\), layers_per_block 1\) has 4 skips"):
        check_compatible(ControlNetModel(**dict(CONFIGS["sd2_like"][0], cross_attention_dim=16)), unet)
    with pytest.raises(ConfigError, match="layers_per_block 2"):
        check_compatible(ControlNetModel(**dict(CONFIGS["sd1_like"][0], layers_per_block=2)), unet)


def test_control_image_of_the_wrong_size_is_a_clear_error():
    controlnet = ControlNetModel(**CONFIGS["sd2_like"][0])
    shapes = controlnet.param_shapes()
    sample, text = jnp.zeros((1, 4, 5, 5)), jnp.zeros((1, 3, 12))
    with pytest.raises(ConfigError, match=r"controlnet_cond \(1, 3, 10, 10\) embeds to 2x2, the latents .* are 5x5: "
                                          r"the control image must be 8 times the latent size"):
        jax.eval_shape(lambda p: controlnet.apply({"params": p}, sample, 1, text, jnp.zeros((1, 3, 10, 10))), shapes)


@pytest.mark.parametrize("key,value", [
    ("mid_block_type", "UNetMidBlock2D"), ("addition_embed_type", "text_time"), ("class_embed_type", "timestep"),
    ("controlnet_conditioning_channel_order", "xyz"), ("resnet_time_scale_shift", "scale_shift"),
    ("only_cross_attention", True), ("conditioning_embedding_out_channels", []),
    ("down_block_types", ["SimpleCrossAttnDownBlock2D", "DownBlock2D"]), ("attention_head_dim", [2, 2, 2]),
])
def test_unsupported_config_is_refused_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=f"ControlNetModel: config key '{key}'"):
        ControlNetModel.from_config(dict(CONFIGS["sd1_like"][0], **{key: value}))
