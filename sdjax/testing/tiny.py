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
WORDS = "a photo of an astronaut riding horse cat dog red blue green circle square on the moon".split()


def write_tiny_tokenizer(folder: Path, words=WORDS, max_length: int = 77) -> dict:
    """A tiny CLIP BPE in the hub layout (vocab.json + merges.txt): the byte alphabet (+ '</w>' forms)
    and whole-word merges for `words`. Returns the vocab."""
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
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>"}))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "model_max_length": max_length, "tokenizer_class": "CLIPTokenizer", "do_lower_case": True}))
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
