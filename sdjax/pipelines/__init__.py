"""Pipelines: each composes the models with the one denoising engine (`engine.denoise`)."""

from .engine import Settings, denoise
from .output import FlaxStableDiffusionPipelineOutput, Trajectory
from .stable_diffusion import FlaxStableDiffusionPipeline
from .classifier_guidance import FlaxStableDiffusionClassifierGuidedPipeline

__all__ = ["FlaxStableDiffusionPipeline", "FlaxStableDiffusionClassifierGuidedPipeline", "FlaxStableDiffusionPipelineOutput", "Trajectory", "Settings", "denoise"]
