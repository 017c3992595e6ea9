"""Pipelines: each composes the models with the one denoising engine (`engine.denoise`)."""

from .engine import Settings, denoise
from .output import FlaxStableDiffusionPipelineOutput, Trajectory
from .stable_diffusion import FlaxStableDiffusionPipeline
from .upscale import FlaxStableDiffusionUpscalePipeline

__all__ = ["FlaxStableDiffusionPipeline", "FlaxStableDiffusionPipelineOutput", "Trajectory", "Settings", "denoise"]
__all__ += ["FlaxStableDiffusionUpscalePipeline"]
