"""Test fixtures shared by tests/ and bench/: tiny random diffusers folders and comparison helpers.

These import torch, diffusers and transformers (the `test` extra) when called; sdjax's runtime never imports
this package.
"""

from .reference import perturb_, rel_err, torch_named_shapes
from .tiny import (SDXL_REFINER_UNET, SDXL_UNET, TEXT, TEXT_2, UNET, VAE, WORDS, build_tiny_pipeline,
                   build_tiny_sdxl_pipeline, build_tiny_sdxl_refiner, write_tiny_tokenizer)
from .tiny import UPSCALER_UNET, UPSCALER_VAE, build_tiny_upscaler

__all__ = ["build_tiny_pipeline", "build_tiny_sdxl_pipeline", "build_tiny_sdxl_refiner", "write_tiny_tokenizer",
           "perturb_", "rel_err", "torch_named_shapes", "UNET", "VAE", "TEXT", "TEXT_2", "SDXL_UNET",
           "SDXL_REFINER_UNET", "WORDS"]
__all__ += ["build_tiny_upscaler", "UPSCALER_UNET", "UPSCALER_VAE"]
