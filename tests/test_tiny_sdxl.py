"""The tiny random SDXL folders of sdjax.testing: diffusers' own pipelines run on them, and sdjax's models load
every component strictly (what the SDXL pipeline builds on)."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the PyTorch reference is a test extra: pip install torch==2.13.0 && pip install -e '.[test]'")
diffusers = pytest.importorskip("diffusers", reason="the PyTorch reference is a test extra: pip install torch==2.13.0 && pip install -e '.[test]'")

from sdjax.models.autoencoder_kl import AutoencoderKL
from sdjax.models.clip_text import CLIPTextModel, CLIPTextModelWithProjection
from sdjax.models.unet_2d_condition import UNet2DConditionModel
from sdjax.testing import build_tiny_sdxl_pipeline, build_tiny_sdxl_refiner
from sdjax.tokenizer import load_tokenizer

pytestmark = pytest.mark.parity


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return (build_tiny_sdxl_pipeline(tmp_path_factory.mktemp("tiny-sdxl")),
            build_tiny_sdxl_refiner(tmp_path_factory.mktemp("tiny-sdxl-refiner")))


def test_diffusers_pipelines_run_on_the_tiny_folders(folders):
    base, refiner = folders
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(base)
    images = pipe("a photo of a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all() and images.std() > 0.01

    pipe2 = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(refiner)
    assert pipe2.text_encoder is None and pipe2.tokenizer is None
    assert pipe2.config.requires_aesthetics_score and not pipe2.config.force_zeros_for_empty_prompt
    refined = pipe2("a photo of a cat", image=images, num_inference_steps=4, strength=0.5,
                    generator=torch.Generator().manual_seed(0), output_type="np").images
    assert refined.shape == (1, 32, 32, 3) and np.isfinite(refined).all()


def test_sdjax_models_load_every_component(folders):
    base, refiner = folders
    index = json.loads((base / "model_index.json").read_text())
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    assert json.loads((refiner / "model_index.json").read_text())["text_encoder"] == [None, None]
    for root, with_first in ((base, True), (refiner, False)):
        unet, _ = UNet2DConditionModel.from_pretrained(root, subfolder="unet")
        te2, _ = CLIPTextModelWithProjection.from_pretrained(root, subfolder="text_encoder_2")
        vae, _ = AutoencoderKL.from_pretrained(root, subfolder="vae")
        assert unet.addition_embed_type == "text_time" and vae.scaling_factor == 0.13025
        n_time_ids = 6 if with_first else 5  # the refiner conditions on the aesthetic score instead of target size
        assert unet.projection_class_embeddings_input_dim == te2.projection_dim + n_time_ids * unet.addition_time_embed_dim
        assert load_tokenizer(root, subfolder="tokenizer_2").pad_token_id == 0  # "!", as SDXL's tokenizer_2
        if with_first:
            te1, _ = CLIPTextModel.from_pretrained(root, subfolder="text_encoder")
            assert unet.cross_attention_dim == te1.hidden_size + te2.hidden_size
            assert load_tokenizer(root, subfolder="tokenizer").pad_token_id == te1.eos_token_id
        else:
            assert unet.cross_attention_dim == te2.hidden_size
