"""Pipelines: each composes the models with the one denoising engine (`engine.denoise`)."""

from .engine import Conditioning, Settings, denoise
from .image_to_image import FlaxStableDiffusionImg2ImgPipeline, FlaxStableDiffusionMergePipeline
from .inpaint import FlaxStableDiffusionInpaintPipeline
from .output import FlaxStableDiffusionPipelineOutput, Trajectory
from .stable_diffusion import FlaxStableDiffusionPipeline
from .classifier_guidance import FlaxStableDiffusionClassifierGuidedPipeline

__all__ = ["FlaxStableDiffusionPipeline", "FlaxStableDiffusionImg2ImgPipeline", "FlaxStableDiffusionInpaintPipeline",
           "FlaxStableDiffusionMergePipeline", "FlaxStableDiffusionClassifierGuidedPipeline",
           "FlaxStableDiffusionPipelineOutput", "Trajectory", "Settings", "Conditioning", "denoise"]
