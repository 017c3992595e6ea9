"""Test fixtures shared by tests/ and bench/: tiny random diffusers folders and comparison helpers.

These import torch, diffusers and transformers (the `test` extra) when called; sdjax's runtime never imports
this package.
"""

from .reference import perturb_, rel_err
from .tiny import TEXT, UNET, VAE, WORDS, build_tiny_pipeline, write_tiny_tokenizer

__all__ = ["build_tiny_pipeline", "write_tiny_tokenizer", "perturb_", "rel_err", "UNET", "VAE", "TEXT", "WORDS"]
