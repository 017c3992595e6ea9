"""Small random Stable Diffusion folders, saved by diffusers/transformers (PyTorch) as users' folders are.

Needs torch, diffusers and transformers (the test extra); imported only by tests/ and bench/. Weights are
perturbed away from their init so that a wrong mapping cannot hide behind symmetric or constant values.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..tokenizer import bytes_to_unicode
from .reference import perturb_

UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
)
VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=32,
    sample_size=32,
)
TEXT = dict(
    bos_token_id=0, eos_token_id=2, hidden_size=32, intermediate_size=37, layer_norm_eps=1e-5,
    num_attention_heads=4, num_hidden_layers=2, pad_token_id=1, max_position_embeddings=77,
)
# SDXL: text_encoder (CLIPTextModel, TEXT) and text_encoder_2 (CLIPTextModelWithProjection, TEXT_2) feed the
# UNet their hidden states concatenated (32 + 32 = cross_attention_dim 64); text_encoder_2's projection
# (text_embeds, 32) and the sinusoids of 6 time ids (original size, crop, target size; 8 each) are
# add_embedding's input (32 + 6 * 8 = 80). Shapes as diffusers' own SDXL pipeline tests.
TEXT_2 = TEXT | dict(hidden_act="gelu", projection_dim=32)  # bigG's text tower uses the erf gelu
SDXL_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2), use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=80,
    cross_attention_dim=64, norm_num_groups=32,
)
# The refiner: text_encoder_2 only (cross_attention_dim 32), 5 time ids (original size, crop, aesthetic score).
SDXL_REFINER_UNET = SDXL_UNET | dict(cross_attention_dim=32, projection_class_embeddings_input_dim=32 + 5 * 8,
                                     transformer_layers_per_block=2)
SDXL_VAE = VAE | dict(scaling_factor=0.13025)
# Euler as SDXL's scheduler_config.json; the extra keys ride along there too (saved from another scheduler).
SDXL_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                      interpolation_type="linear", prediction_type="epsilon", steps_offset=1,
                      timestep_spacing="leading", use_karras_sigmas=False)
SDXL_SCHEDULER_EXTRA = dict(clip_sample=False, sample_max_value=1.0, set_alpha_to_one=False, skip_prk_steps=True)
WORDS = "a photo of an astronaut riding horse cat dog red blue green circle square on the moon".split()


def write_tiny_tokenizer(folder: Path, words=WORDS, max_length: int = 77, pad_token: str = "<|endoftext|>") -> dict:
    """A tiny CLIP BPE in the hub layout (vocab.json + merges.txt): the byte alphabet (+ '</w>' forms)
    and whole-word merges for `words`. Returns the vocab.

    pad_token: SD 1.x pads with EOS (the default); SD 2.x's tokenizer and SDXL's tokenizer_2 pad with "!" (id 0)."""
    chars = list(bytes_to_unicode().values())
    vocab, merges = chars + [c + "</w>" for c in chars], []
    for w in words:
        parts = list(w[:-1]) + [w[-1] + "</w>"]
        while len(parts) > 1:
            merge, tok = f"{parts[0]} {parts[1]}", parts[0] + parts[1]
            if merge not in merges:
                merges.append(merge)
            if tok not in vocab:
                vocab.append(tok)
            parts = [tok] + parts[2:]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    # what SD 1.5's tokenizer/ also carries
    (folder / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": pad_token,
        "unk_token": "<|endoftext|>"}))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "model_max_length": max_length, "tokenizer_class": "CLIPTokenizer", "do_lower_case": True,
        "pad_token": pad_token}))
    return {t: i for i, t in enumerate(vocab)}


def build_tiny_pipeline(folder: Path, seed: int = 0, prediction_type: str = "epsilon",
                        unet_overrides: dict | None = None) -> Path:
    """Save a small random StableDiffusionPipeline with diffusers, as `save_pretrained` writes it."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    torch.manual_seed(seed)
    write_tiny_tokenizer(folder / "_tok")
    tokenizer = CLIPTokenizer.from_pretrained(folder / "_tok")
    text = TEXT | {"vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id,
                   "bos_token_id": tokenizer.bos_token_id, "pad_token_id": tokenizer.pad_token_id}
    unet = perturb_(UNet2DConditionModel(**(UNET | (unet_overrides or {}))), seed)
    vae = perturb_(AutoencoderKL(**VAE), seed + 1)
    text_encoder = perturb_(CLIPTextModel(CLIPTextConfig(**text)), seed + 2)
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, skip_prk_steps=True, set_alpha_to_one=False,
                              steps_offset=1, prediction_type=prediction_type)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder)
    shutil.rmtree(folder / "_tok")
    # As SD 1.x's scheduler_config.json: `clip_sample: false` rides along for schedulers switched to later (DDIM).
    cfg_path = folder / "scheduler" / "scheduler_config.json"
    cfg_path.write_text(json.dumps(json.loads(cfg_path.read_text()) | {"clip_sample": False}, indent=2))
    return folder


def _tiny_text_encoders(folder: Path, seed: int, first: bool):
    """(tokenizer, text_encoder, tokenizer_2, text_encoder_2), perturbed; the first pair only if `first`."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    def ids(tok):
        return {"vocab_size": len(tok), "eos_token_id": tok.eos_token_id, "bos_token_id": tok.bos_token_id,
                "pad_token_id": tok.pad_token_id}

    torch.manual_seed(seed)
    tokenizer = text_encoder = None
    if first:
        write_tiny_tokenizer(folder / "_tok")
        tokenizer = CLIPTokenizer.from_pretrained(folder / "_tok")
        text_encoder = perturb_(CLIPTextModel(CLIPTextConfig(**TEXT | ids(tokenizer))), seed + 2)
    write_tiny_tokenizer(folder / "_tok2", pad_token="!")  # SDXL's tokenizer_2 pads with "!" (id 0)
    tokenizer_2 = CLIPTokenizer.from_pretrained(folder / "_tok2")
    text_encoder_2 = perturb_(CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_2 | ids(tokenizer_2))), seed + 3)
    return tokenizer, text_encoder, tokenizer_2, text_encoder_2


def _finish_sdxl_folder(pipe, folder: Path) -> Path:
    pipe.save_pretrained(folder)
    for tmp in ("_tok", "_tok2"):
        shutil.rmtree(folder / tmp, ignore_errors=True)
    cfg_path = folder / "scheduler" / "scheduler_config.json"
    cfg_path.write_text(json.dumps(json.loads(cfg_path.read_text()) | SDXL_SCHEDULER_EXTRA, indent=2))
    return folder


def build_tiny_sdxl_pipeline(folder: Path, seed: int = 0) -> Path:
    """Save a small random StableDiffusionXLPipeline with diffusers: vae, text_encoder (CLIPTextModel) +
    tokenizer, text_encoder_2 (CLIPTextModelWithProjection) + tokenizer_2, a text_time UNet, Euler."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    folder = Path(folder)
    tokenizer, text_encoder, tokenizer_2, text_encoder_2 = _tiny_text_encoders(folder, seed, first=True)
    unet = perturb_(UNet2DConditionModel(**SDXL_UNET), seed)
    vae = perturb_(AutoencoderKL(**SDXL_VAE), seed + 1)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet,
                                     scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER), add_watermarker=False)
    return _finish_sdxl_folder(pipe, folder)


def build_tiny_sdxl_refiner(folder: Path, seed: int = 0) -> Path:
    """Save a small random SDXL refiner (StableDiffusionXLImg2ImgPipeline) with diffusers, as the real one:
    no text_encoder/tokenizer, text_encoder_2 + tokenizer_2 only, requires_aesthetics_score=True (5 time
    ids), force_zeros_for_empty_prompt=False."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline, UNet2DConditionModel

    folder = Path(folder)
    _, _, tokenizer_2, text_encoder_2 = _tiny_text_encoders(folder, seed, first=False)
    unet = perturb_(UNet2DConditionModel(**SDXL_REFINER_UNET), seed)
    vae = perturb_(AutoencoderKL(**SDXL_VAE), seed + 1)
    pipe = StableDiffusionXLImg2ImgPipeline(vae=vae, text_encoder=None, text_encoder_2=text_encoder_2,
                                            tokenizer=None, tokenizer_2=tokenizer_2, unet=unet,
                                            scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER),
                                            requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
                                            add_watermarker=False)
    return _finish_sdxl_folder(pipe, folder)


# The SD x4 upscaler in small (diffusers' own upscaler tests use the same shapes): a 7-channel UNet (4 latent + 3
# image channels) with the noise level as a class label and only_cross_attention on its high-resolution attention
# block, a factor-4 VAE with the upscaler's scaling factor, DDPM for the low-resolution image, DDIM (v-prediction,
# as the real one) for the latents.
UPSCALER_UNET = dict(
    sample_size=16, in_channels=7, out_channels=4, layers_per_block=1, block_out_channels=(32, 32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), only_cross_attention=(True, True, False),
    num_class_embeds=1000, cross_attention_dim=32, attention_head_dim=8, use_linear_projection=True, norm_num_groups=32,
)
UPSCALER_VAE = VAE | dict(block_out_channels=(32, 32, 64), down_block_types=("DownEncoderBlock2D",) * 3,
                          up_block_types=("UpDecoderBlock2D",) * 3, scaling_factor=0.08333, sample_size=64)
UPSCALER_LOW_RES_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                                  beta_schedule="scaled_linear", clip_sample=False, variance_type="fixed_small")
UPSCALER_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction")


def build_tiny_upscaler(folder: Path, seed: int = 0) -> Path:
    """Save a small random StableDiffusionUpscalePipeline with diffusers (max_noise_level 350, as the real one)."""
    import torch
    from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionUpscalePipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    torch.manual_seed(seed)
    write_tiny_tokenizer(folder / "_tok")
    tokenizer = CLIPTokenizer.from_pretrained(folder / "_tok")
    text = TEXT | {"vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id,
                   "bos_token_id": tokenizer.bos_token_id, "pad_token_id": tokenizer.pad_token_id}
    pipe = StableDiffusionUpscalePipeline(
        vae=perturb_(AutoencoderKL(**UPSCALER_VAE), seed + 1),
        text_encoder=perturb_(CLIPTextModel(CLIPTextConfig(**text)), seed + 2), tokenizer=tokenizer,
        unet=perturb_(UNet2DConditionModel(**UPSCALER_UNET), seed),
        low_res_scheduler=DDPMScheduler(**UPSCALER_LOW_RES_SCHEDULER), scheduler=DDIMScheduler(**UPSCALER_SCHEDULER),
        max_noise_level=350)
    pipe.save_pretrained(folder)
    shutil.rmtree(folder / "_tok")
    return folder
