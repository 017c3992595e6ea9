"""Pipelines: each composes the models with the one denoising engine (`engine.denoise`)."""

from .engine import Conditioning, Settings, denoise
from .image_to_image import FlaxStableDiffusionImg2ImgPipeline, FlaxStableDiffusionMergePipeline
from .inpaint import FlaxStableDiffusionInpaintPipeline
from .output import FlaxStableDiffusionPipelineOutput, Trajectory
from .stable_diffusion import FlaxStableDiffusionPipeline
from .upscale import FlaxStableDiffusionUpscalePipeline

__all__ = ["FlaxStableDiffusionPipeline", "FlaxStableDiffusionImg2ImgPipeline", "FlaxStableDiffusionInpaintPipeline",
           "FlaxStableDiffusionMergePipeline", "FlaxStableDiffusionPipelineOutput", "Trajectory", "Settings",
           "Conditioning", "denoise"]
__all__ += ["FlaxStableDiffusionUpscalePipeline"]
