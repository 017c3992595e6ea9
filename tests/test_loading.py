"""Loading and saving: folder formats, strictness, and the errors users see for bad input."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from sdjax import ConfigError, SdjaxError, WeightsError
from sdjax.models.autoencoder_kl import AutoencoderKL

VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1, norm_num_groups=4, sample_size=16,
)
WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    """A tiny diffusers AutoencoderKL saved by diffusers itself (PyTorch naming and layouts)."""
    import torch
    from diffusers import AutoencoderKL as TorchVAE

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("vae")
    TorchVAE(**VAE_CONFIG).save_pretrained(d)
    return d


def copy_of(src, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst


def test_loads_and_dtype(vae_dir):
    model, params = AutoencoderKL.from_pretrained(vae_dir, dtype=jnp.bfloat16)
    leaves = jax.tree_util.tree_leaves(params)
    assert all(x.dtype == jnp.bfloat16 for x in leaves)
    assert model.dtype == jnp.bfloat16
    _, params32 = AutoencoderKL.from_pretrained(vae_dir, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params32))


def test_subfolder(vae_dir, tmp_path):
    root = tmp_path / "pipe"
    shutil.copytree(vae_dir, root / "vae")
    AutoencoderKL.from_pretrained(root, subfolder="vae")
    with pytest.raises(SdjaxError, match="subfolder 'unet' not found"):
        AutoencoderKL.from_pretrained(root, subfolder="unet")


def test_missing_folder(tmp_path):
    with pytest.raises(SdjaxError, match="model folder not found"):
        AutoencoderKL.from_pretrained(tmp_path / "nope")


def test_repo_id_offline_names_the_id(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SdjaxError, match="no-such-owner/no-such-model"):
        AutoencoderKL.from_pretrained("no-such-owner/no-such-model", subfolder="vae")


def test_truncated_safetensors(vae_dir, tmp_path):
    d = copy_of(vae_dir, tmp_path)
    data = (d / WEIGHTS).read_bytes()
    (d / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="cannot read safetensors file .*truncated"):
        AutoencoderKL.from_pretrained(d)


def test_renamed_tensor_lists_missing_and_unexpected(vae_dir, tmp_path):
    d = copy_of(vae_dir, tmp_path)
    state = load_file(d / WEIGHTS)
    state["decoder.conv_in.wieght"] = state.pop("decoder.conv_in.weight")
    save_file(state, d / WEIGHTS)
    with pytest.raises(WeightsError) as e:
        AutoencoderKL.from_pretrained(d)
    msg = str(e.value)
    assert "1 missing" in msg and "decoder.conv_in.weight" in msg
    assert "1 unexpected" in msg and "decoder.conv_in.wieght" in msg


def test_wrong_shape_names_both_shapes(vae_dir, tmp_path):
    d = copy_of(vae_dir, tmp_path)
    state = load_file(d / WEIGHTS)
    w = state["decoder.conv_in.weight"]
    state["decoder.conv_in.weight"] = np.zeros((w.shape[0] + 1,) + w.shape[1:], w.dtype)
    save_file(state, d / WEIGHTS)
    with pytest.raises(WeightsError, match=r"decoder.conv_in.weight: \(17, 4, 3, 3\) vs \(16, 4, 3, 3\)"):
        AutoencoderKL.from_pretrained(d)


def test_pickle_refused_unless_opted_in(vae_dir, tmp_path):
    import torch

    d = copy_of(vae_dir, tmp_path)
    state = {k: torch.from_numpy(v) for k, v in load_file(d / WEIGHTS).items()}
    (d / WEIGHTS).unlink()
    torch.save(state, d / "diffusion_pytorch_model.bin")
    with pytest.raises(WeightsError, match="pickled weights.*allow_pickle=True"):
        AutoencoderKL.from_pretrained(d)
    _, p_pickle = AutoencoderKL.from_pretrained(d, allow_pickle=True)
    _, p_safe = AutoencoderKL.from_pretrained(vae_dir)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda a, b: bool(jnp.array_equal(a, b)), p_pickle, p_safe))


def test_sharded_safetensors(vae_dir, tmp_path):
    d = copy_of(vae_dir, tmp_path)
    state = load_file(d / WEIGHTS)
    (d / WEIGHTS).unlink()
    keys = sorted(state)
    shards = {"part-1.safetensors": keys[: len(keys) // 2], "part-2.safetensors": keys[len(keys) // 2:]}
    for name, ks in shards.items():
        save_file({k: state[k] for k in ks}, d / name)
    index = {"metadata": {}, "weight_map": {k: name for name, ks in shards.items() for k in ks}}
    (d / f"{WEIGHTS}.index.json").write_text(json.dumps(index))
    _, p_sharded = AutoencoderKL.from_pretrained(d)
    _, p_single = AutoencoderKL.from_pretrained(vae_dir)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda a, b: bool(jnp.array_equal(a, b)), p_sharded, p_single))
    (d / "part-2.safetensors").unlink()
    with pytest.raises(WeightsError, match="part-2.safetensors"):
        AutoencoderKL.from_pretrained(d)


def test_legacy_flax_msgpack(vae_dir, tmp_path):
    """Old diffusers-Flax VAEs named their attention query/key/value/proj_attn; those files load."""
    from flax.serialization import msgpack_serialize
    from flax.traverse_util import flatten_dict, unflatten_dict

    _, params = AutoencoderKL.from_pretrained(vae_dir)
    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out_0": "proj_attn"}
    flat = flatten_dict(jax.device_get(params))
    legacy = unflatten_dict({tuple(old_names.get(p, p) for p in path): np.asarray(v) for path, v in flat.items()})
    d = tmp_path / "legacy"
    d.mkdir()
    shutil.copy(vae_dir / "config.json", d / "config.json")
    (d / "diffusion_flax_model.msgpack").write_bytes(msgpack_serialize(legacy))
    _, p_legacy = AutoencoderKL.from_pretrained(d)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda a, b: bool(jnp.array_equal(a, b)), p_legacy, params))


def test_no_weights_and_no_config(vae_dir, tmp_path):
    d = copy_of(vae_dir, tmp_path)
    (d / WEIGHTS).unlink()
    with pytest.raises(WeightsError, match="no weights found in .*diffusion_pytorch_model.safetensors"):
        AutoencoderKL.from_pretrained(d)
    (d / "config.json").unlink()
    with pytest.raises(WeightsError, match="no config.json"):
        AutoencoderKL.from_pretrained(d)


def test_bad_json_config(vae_dir, tmp_path):
    d = copy_of(vae_dir, tmp_path)
    (d / "config.json").write_text("{not json")
    with pytest.raises(WeightsError, match="config.json is not valid JSON"):
        AutoencoderKL.from_pretrained(d)


def test_unsupported_config_value_names_key(vae_dir, tmp_path):
    d = copy_of(vae_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["down_block_types"] = ["DownEncoderBlock2D", "SomethingElse2D"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises((ConfigError, SdjaxError), match="SomethingElse2D"):
        AutoencoderKL.from_pretrained(d)


def test_save_is_atomic_and_bf16_roundtrips(vae_dir, tmp_path):
    model, params = AutoencoderKL.from_pretrained(vae_dir, dtype=jnp.bfloat16)
    out = tmp_path / "saved"
    model.save_pretrained(out, params)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", WEIGHTS]  # no temp files left
    _, again = AutoencoderKL.from_pretrained(out, dtype=jnp.bfloat16)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda a, b: bool(jnp.array_equal(a, b)), again, params))
