"""Stable Diffusion's networks in Flax Linen, loadable from diffusers/transformers folders."""

from .modeling_utils import FlaxModelMixin
