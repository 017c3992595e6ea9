"""Stable Diffusion's networks in Flax Linen, loadable from diffusers/transformers folders."""

from .controlnet import ControlNetModel, ControlNetOutput, check_compatible
from .modeling_utils import FlaxModelMixin
from .noise_classifier import NoiseClassifier
