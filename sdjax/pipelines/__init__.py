"""Pipelines: each composes the models with the one denoising engine (`engine.denoise`)."""

from .engine import Conditioning, Settings, denoise, show_progress
from .image_to_image import FlaxStableDiffusionImg2ImgPipeline, FlaxStableDiffusionMergePipeline
from .inpaint import FlaxStableDiffusionInpaintPipeline
from .output import FlaxStableDiffusionPipelineOutput, Trajectory
from .stable_diffusion import FlaxStableDiffusionPipeline

__all__ = ["FlaxStableDiffusionPipeline", "FlaxStableDiffusionImg2ImgPipeline", "FlaxStableDiffusionInpaintPipeline",
           "FlaxStableDiffusionMergePipeline", "FlaxStableDiffusionPipelineOutput", "Trajectory", "Settings",
           "Conditioning", "denoise", "show_progress"]
