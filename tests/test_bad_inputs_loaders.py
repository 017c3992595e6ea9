"""The careless user of the loaders: broken, foreign or hostile weight folders are refused with an error naming
the file and tensor (WeightsError / SdjaxError), never loaded silently wrong."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from sdjax import SdjaxError, WeightsError
from sdjax.models.autoencoder_kl import AutoencoderKL

@pytest.fixture()
def vae_dir(tmp_path, tiny_folder):
    folder = tmp_path / "vae"
    shutil.copytree(tiny_folder / "vae", folder)
    return folder


def test_non_finite_weights_are_named(vae_dir):
    path = vae_dir / "diffusion_pytorch_model.safetensors"
    tensors = load_file(path)
    tensors["decoder.conv_in.bias"][3] = math.nan
    tensors["encoder.conv_out.weight"][0, 0, 0, 0] = math.inf
    save_file(tensors, path)
    with pytest.raises(WeightsError, match=r"2 holding NaN or inf[\s\S]*decoder.conv_in.bias: 1 non-finite"):
        AutoencoderKL.from_pretrained(vae_dir)
    AutoencoderKL.from_pretrained(vae_dir, check_finite=False)  # the opt-out, for speed or inspection


def test_integer_and_boolean_tensors_are_refused(vae_dir):
    path = vae_dir / "diffusion_pytorch_model.safetensors"
    tensors = load_file(path)
    tensors["decoder.conv_in.bias"] = tensors["decoder.conv_in.bias"].astype(np.int32)
    tensors["encoder.conv_in.bias"] = tensors["encoder.conv_in.bias"] > 0
    save_file(tensors, path)
    with pytest.raises(WeightsError, match=r"integer or boolean dtype[\s\S]*decoder.conv_in.bias: int32"
                                           r"[\s\S]*encoder.conv_in.bias: bool"):
        AutoencoderKL.from_pretrained(vae_dir)


def _shard(vae_dir, split_twice: bool = False, outside: str | None = None):
    path = vae_dir / "diffusion_pytorch_model.safetensors"
    tensors = load_file(path)
    path.unlink()
    keys = sorted(tensors)
    a, b = keys[: len(keys) // 2], keys[len(keys) // 2:]
    if split_twice:
        b = b + a[:1]
    save_file({k: tensors[k] for k in a}, vae_dir / "part-1.safetensors")
    save_file({k: tensors[k] for k in b}, vae_dir / "part-2.safetensors")
    weight_map = {k: "part-1.safetensors" for k in a} | {k: "part-2.safetensors" for k in b}
    if outside:
        weight_map[a[0]] = outside
    (vae_dir / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def test_tensor_in_two_shards_is_an_error(vae_dir):
    _shard(vae_dir, split_twice=True)
    with pytest.raises(WeightsError, match="is in two weight files"):
        AutoencoderKL.from_pretrained(vae_dir)


@pytest.mark.parametrize("outside", ["../../etc/x.safetensors", "/tmp/x.safetensors"])
def test_weight_map_must_stay_inside_the_folder(vae_dir, outside):
    _shard(vae_dir, outside=outside)
    with pytest.raises(WeightsError, match=f"weight_map entry '{outside}' points outside"):
        AutoencoderKL.from_pretrained(vae_dir)


def test_model_index_and_folder_errors(tmp_path, tiny_folder):
    from sdjax.pipelines import FlaxStableDiffusionPipeline

    folder = tmp_path / "m"
    shutil.copytree(tiny_folder, folder)
    (folder / "model_index.json").write_text("[1, 2]")
    with pytest.raises(SdjaxError, match="model_index.json: expected a JSON object"):
        FlaxStableDiffusionPipeline.from_pretrained(folder)
    (folder / "model_index.json").unlink()
    with pytest.raises(SdjaxError, match="model_index.json is missing"):
        FlaxStableDiffusionPipeline.from_pretrained(folder)
    with pytest.raises(SdjaxError, match="is a file, not a folder"):
        FlaxStableDiffusionPipeline.from_pretrained(tiny_folder / "model_index.json")
    with pytest.raises(SdjaxError, match="'no/such/place' is not a local folder"):
        FlaxStableDiffusionPipeline.from_pretrained("no/such/place")
