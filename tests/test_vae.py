"""AutoencoderKL (sdjax.models.autoencoder_kl) against diffusers' PyTorch AutoencoderKL on small random models."""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdjax.errors import ConfigError
from sdjax.models.autoencoder_kl import AutoencoderKL
from sdjax.models.vae import DiagonalGaussianDistribution
from sdjax.testing import perturb_, rel_err

torch = pytest.importorskip("torch", reason="the PyTorch reference is a test extra: pip install torch==2.13.0 && pip install -e '.[test]'")
diffusers = pytest.importorskip("diffusers", reason="the PyTorch reference is a test extra: pip install torch==2.13.0 && pip install -e '.[test]'")

pytestmark = pytest.mark.parity  # every test here compares with the PyTorch reference

FP32_TOL = 1e-4
# bf16 weights and compute vs the fp32 torch reference. Measured max 2.7e-2 (logvar, f8; decode 2.1e-2), the
# same level as diffusers' own bf16 model against its fp32 self on these configs (1.2e-2 .. 2.7e-2).
BF16_TOL = 5e-2

# f = 1, 2, 4, 8 (1..4 blocks); they also cover layers_per_block 1/2, groups 8/32, no (post_)quant_conv,
# no mid-block attention and a non-square image.
CONFIGS = {
    "f1": dict(block_out_channels=(32,), layers_per_block=1, norm_num_groups=8, size=(16, 16)),
    "f2": dict(block_out_channels=(32, 64), layers_per_block=2, norm_num_groups=8, size=(16, 16)),
    "f4": dict(block_out_channels=(32, 32, 64), layers_per_block=1, norm_num_groups=32, size=(32, 24),
               use_quant_conv=False, use_post_quant_conv=False),
    "f8": dict(block_out_channels=(16, 32, 32, 64), layers_per_block=1, norm_num_groups=8, size=(32, 32)),
    "f2_noattn": dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, size=(16, 16),
                      mid_block_add_attention=False),
}
BATCH = 2

SD15_VAE_CONFIG = {
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0", "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3,
    "sample_size": 512, "up_block_types": ["UpDecoderBlock2D"] * 4,
}
SD15_VAE_PARAMS = 83_653_863


def torch_config(spec):
    n = len(spec["block_out_channels"])
    cfg = {k: v for k, v in spec.items() if k != "size"}
    return dict(cfg, in_channels=3, out_channels=3, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * n,
                up_block_types=("UpDecoderBlock2D",) * n, sample_size=spec["size"][0])


def make_inputs(spec, seed=0):
    rng = np.random.default_rng(seed)
    h, w = spec["size"]
    f = 2 ** (len(spec["block_out_channels"]) - 1)
    images = rng.uniform(-1, 1, (2 * BATCH, 3, h, w)).astype(np.float32)  # two batches: KL(p || q) needs q
    latents = rng.standard_normal((BATCH, 4, h // f, w // f)).astype(np.float32)
    return images, latents


def torch_outputs(tmodel, images, latents):
    with torch.no_grad():
        post = tmodel.encode(torch.from_numpy(images)).latent_dist
        p = diffusers.models.autoencoders.vae.DiagonalGaussianDistribution(post.parameters[:BATCH])
        q = diffusers.models.autoencoders.vae.DiagonalGaussianDistribution(post.parameters[BATCH:])
        dec = tmodel.decode(torch.from_numpy(latents)).sample
        return {"mean": p.mean.numpy(), "logvar": p.logvar.numpy(), "kl": p.kl().numpy(), "kl_q": p.kl(q).numpy(),
                "decode": dec.numpy()}


def jax_forward(model):
    """One jitted function per model (params are an argument, so models with equal configs share it)."""

    @jax.jit
    def run(params, images, latents):
        post = model.apply({"params": params}, images, method=model.encode)
        p = DiagonalGaussianDistribution(post.mean[:BATCH], post.logvar[:BATCH])
        q = DiagonalGaussianDistribution(post.mean[BATCH:], post.logvar[BATCH:])
        dec = model.apply({"params": params}, latents, method=model.decode)
        return {"mean": p.mean, "logvar": p.logvar, "kl": p.kl(), "kl_q": p.kl(q), "decode": dec}

    return run


def errors(out, ref):
    return {k: rel_err(np.asarray(out[k], np.float32), ref[k]) for k in ref}


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """Per config name: the perturbed torch model saved with save_pretrained, its outputs, and sdjax's load."""
    cache = {}

    def get(name):
        if name not in cache:
            spec = CONFIGS[name]
            torch.manual_seed(0)
            tmodel = perturb_(diffusers.AutoencoderKL(**torch_config(spec)).eval(), seed=1)
            folder = tmp_path_factory.mktemp(f"vae_{name}")
            tmodel.save_pretrained(folder, safe_serialization=True)
            images, latents = make_inputs(spec)
            model, params = AutoencoderKL.from_pretrained(folder)
            cache[name] = dict(spec=spec, tmodel=tmodel, folder=folder, images=images, latents=latents,
                               ref=torch_outputs(tmodel, images, latents), model=model, params=params,
                               run=jax_forward(model))
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_fp32(case, name):
    c = case(name)
    assert c["model"].block_out_channels == c["spec"]["block_out_channels"]
    out = c["run"](c["params"], c["images"], c["latents"])
    errs = errors(out, c["ref"])
    print(f"fp32 {name}: " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()))
    h, w = c["spec"]["size"]
    assert out["decode"].shape == (BATCH, 3, h, w)
    assert max(errs.values()) <= FP32_TOL, errs


@pytest.mark.parametrize("name", ["f2", "f8"])
def test_parity_bf16(case, name):
    c = case(name)
    model, params = AutoencoderKL.from_pretrained(c["folder"], dtype=jnp.bfloat16)
    assert jax.tree_util.tree_leaves(params)[0].dtype == jnp.bfloat16
    out = jax_forward(model)(params, c["images"], c["latents"])
    assert out["decode"].dtype == jnp.bfloat16
    errs = errors(out, c["ref"])
    print(f"bf16 {name}: " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()))
    assert max(errs.values()) <= BF16_TOL, errs


def test_old_attention_key_names(case, tmp_path):
    """SD 1.5-era names (query/key/value/proj_attn), also as 1x1 conv weights [O, I, 1, 1], load and match."""
    from safetensors.numpy import load_file, save_file

    c = case("f2")
    state = load_file(os.path.join(c["folder"], "diffusion_pytorch_model.safetensors"))
    names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old, n_renamed = {}, 0
    for k, v in state.items():
        m = re.fullmatch(r"(.*attentions\.\d+)\.(to_q|to_k|to_v|to_out\.0)\.(weight|bias)", k)
        if m:
            n_renamed += 1
            k = f"{m[1]}.{names[m[2]]}.{m[3]}"
            if m[3] == "weight" and k.startswith("decoder"):
                v = v[:, :, None, None]  # the very old 1x1-conv storage
        old[k] = v
    assert n_renamed == 16 and not any("to_q" in k for k in old)
    save_file(old, tmp_path / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((c["folder"] / "config.json").read_text())

    model, params = AutoencoderKL.from_pretrained(tmp_path)
    assert model == c["model"]
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, c["params"])
    out = c["run"](params, c["images"], c["latents"])
    assert max(errors(out, c["ref"]).values()) <= FP32_TOL


def test_save_round_trip_to_diffusers(case, tmp_path):
    """sdjax save_pretrained -> diffusers from_pretrained -> the same decode (and encode)."""
    c = case("f8")
    c["model"].save_pretrained(tmp_path, c["params"])
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["_class_name"] == "AutoencoderKL" and cfg["block_out_channels"] == [16, 32, 32, 64]
    tmodel = diffusers.AutoencoderKL.from_pretrained(tmp_path).eval()
    ref = torch_outputs(tmodel, c["images"], c["latents"])
    for k in ref:
        np.testing.assert_allclose(ref[k], c["ref"][k], rtol=0, atol=1e-6 * np.abs(c["ref"][k]).max())
    out = c["run"](c["params"], c["images"], c["latents"])
    assert max(errors(out, ref).values()) <= FP32_TOL


def test_call_and_chunked_decode_under_jit(case):
    """__call__ (mode / posterior sample) and decode inside jit + lax.map over chunks and vmap."""
    c = case("f1")
    model, params = c["model"], c["params"]
    x = c["images"][:BATCH]
    with torch.no_grad():
        ref = c["tmodel"](torch.from_numpy(x)).sample.numpy()
    assert rel_err(model.apply({"params": params}, x), ref) <= FP32_TOL

    key = jax.random.PRNGKey(3)
    post = model.apply({"params": params}, x, method=model.encode)
    z = post.sample(key)
    y = model.apply({"params": params}, x, sample_posterior=True, key=key)
    y2 = model.apply({"params": params}, x, sample_posterior=True, rngs={"sample": key})
    np.testing.assert_allclose(y, model.apply({"params": params}, z, method=model.decode), atol=1e-5)
    # rngs={'sample': key}: a key derived from it (Flax folds in the module path); deterministic, not the mode
    np.testing.assert_array_equal(y2, model.apply({"params": params}, x, sample_posterior=True, rngs={"sample": key}))
    assert rel_err(y2, ref) > 1e-3 and rel_err(y, ref) > 1e-3
    with pytest.raises(ValueError, match="key"):
        model.apply({"params": params}, x, sample_posterior=True)

    traj = jnp.asarray(np.random.default_rng(1).standard_normal((6, 1, 4, 16, 16)), jnp.float32)  # [T, B, C, h, w]
    decode = lambda zz: model.apply({"params": params}, zz, method=model.decode)

    @jax.jit
    def chunked(t):
        chunks = t.reshape(3, 2, *t.shape[1:])  # 3 chunks of 2 steps, each step a batch
        return jax.lax.map(jax.vmap(decode), chunks).reshape(t.shape[0], t.shape[1], 3, 16, 16)

    full = decode(traj.reshape(6, 4, 16, 16)).reshape(6, 1, 3, 16, 16)
    np.testing.assert_allclose(chunked(traj), full, rtol=0, atol=1e-5 * float(jnp.abs(full).max()))


def test_posterior_sampling_statistics():
    rng = np.random.default_rng(0)
    mean = jnp.asarray(rng.uniform(-2, 2, (4, 4, 32, 32)), jnp.float32)
    logvar = jnp.asarray(rng.uniform(-3, 1, (4, 4, 32, 32)), jnp.float32)
    d = DiagonalGaussianDistribution(mean, logvar)
    s = d.sample(jax.random.PRNGKey(0))
    eps = np.asarray((s - mean) / d.std)  # 16384 standardised draws
    assert abs(eps.mean()) < 0.03 and abs(eps.std() - 1) < 0.03
    assert not np.allclose(d.sample(jax.random.PRNGKey(1)), s)
    np.testing.assert_array_equal(d.mode(), mean)
    # batch of draws at one element: mean and std
    many = jax.vmap(d.sample)(jax.random.split(jax.random.PRNGKey(2), 2000))[:, 0, 0, 0, 0]
    assert abs(float(many.mean()) - float(mean[0, 0, 0, 0])) < 4 * float(d.std[0, 0, 0, 0]) / np.sqrt(2000)
    assert abs(float(many.std()) / float(d.std[0, 0, 0, 0]) - 1) < 0.07
    # clipping, deterministic, pytree
    p = DiagonalGaussianDistribution.from_parameters(jnp.concatenate([mean, jnp.full_like(mean, 50.0)], axis=1))
    assert float(p.logvar.max()) == 20.0 and float(p.var.max()) == pytest.approx(np.exp(20.0), rel=1e-6)
    assert jax.tree_util.tree_leaves(p)[0] is p.mean
    det = DiagonalGaussianDistribution(mean, logvar, deterministic=True)
    np.testing.assert_array_equal(det.sample(jax.random.PRNGKey(0)), mean)
    # KL(p || p) = 0, KL against N(0, 1) = the closed form
    np.testing.assert_allclose(d.kl(d), 0.0, atol=1e-3)
    ref = 0.5 * np.sum(np.asarray(mean) ** 2 + np.exp(np.asarray(logvar)) - 1 - np.asarray(logvar), axis=(1, 2, 3))
    np.testing.assert_allclose(d.kl(), ref, rtol=1e-5)


def test_sd15_vae_config_builds_with_diffusers_param_count_and_names():
    """The real SD 1.5 VAE config, built abstractly: same parameter count, names and shapes as diffusers'."""
    from sdjax import convert

    model = AutoencoderKL.from_config(SD15_VAE_CONFIG)
    assert model.vae_scale_factor == 8 and model.block_out_channels == (128, 256, 512, 512)
    shapes = model.param_shapes()
    assert sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes)) == SD15_VAE_PARAMS
    cfg = {k: v for k, v in SD15_VAE_CONFIG.items() if not k.startswith("_")}
    with torch.device("meta"):
        tmodel = diffusers.AutoencoderKL(**cfg)
    state = {k: np.lib.stride_tricks.as_strided(np.zeros((), np.float32), shape=tuple(v.shape),
                                                strides=(0,) * v.ndim)
             for k, v in tmodel.state_dict().items()}
    assert sum(int(np.prod(v.shape)) for v in state.values()) == SD15_VAE_PARAMS
    _, report = convert.torch_to_flax(state, shapes, AutoencoderKL._key_renames)
    assert report.ok, report


def test_unsupported_config_values_fail_naming_key():
    base = {k: v for k, v in SD15_VAE_CONFIG.items()}
    with pytest.raises(ConfigError, match="act_fn.*gelu"):
        AutoencoderKL.from_config(dict(base, act_fn="gelu"))
    with pytest.raises(ConfigError, match="down_block_types.*AttnDownEncoderBlock2D"):
        AutoencoderKL.from_config(dict(base, down_block_types=["AttnDownEncoderBlock2D"] + ["DownEncoderBlock2D"] * 3))
    with pytest.raises(ConfigError, match="up_block_types"):
        AutoencoderKL.from_config(dict(base, up_block_types=["UpDecoderBlock2D"] * 3))
    # informational keys of newer VAEs (SDXL / SD3 / FLUX) are accepted and kept
    m = AutoencoderKL.from_config(dict(base, scaling_factor=0.3611, shift_factor=0.1159, force_upcast=False,
                                       latents_mean=[0.0] * 4, latents_std=[1.0] * 4))
    assert m.config["shift_factor"] == 0.1159 and m.config["latents_mean"] == (0.0,) * 4
