"""Pipelines: each composes the models with the one denoising engine (`engine.denoise`)."""

from .controlnet import FlaxStableDiffusionControlNetImg2ImgPipeline, FlaxStableDiffusionControlNetPipeline
from .engine import Conditioning, Settings, denoise, show_progress
from .image_to_image import FlaxStableDiffusionImg2ImgPipeline, FlaxStableDiffusionMergePipeline
from .inpaint import FlaxStableDiffusionInpaintPipeline
from .output import FlaxStableDiffusionPipelineOutput, Trajectory
from .stable_diffusion import FlaxStableDiffusionPipeline
from .stable_diffusion_xl import FlaxStableDiffusionXLImg2ImgPipeline, FlaxStableDiffusionXLPipeline
from .auto import load_pipeline
from .classifier_guidance import FlaxStableDiffusionClassifierGuidedPipeline
from .upscale import FlaxStableDiffusionUpscalePipeline

__all__ = ["FlaxStableDiffusionPipeline", "FlaxStableDiffusionImg2ImgPipeline", "FlaxStableDiffusionInpaintPipeline",
           "FlaxStableDiffusionMergePipeline", "FlaxStableDiffusionPipelineOutput", "Trajectory", "Settings",
           "Conditioning", "denoise", "show_progress", "FlaxStableDiffusionXLPipeline", "FlaxStableDiffusionXLImg2ImgPipeline",
           "load_pipeline", "FlaxStableDiffusionControlNetPipeline", "FlaxStableDiffusionControlNetImg2ImgPipeline",
           "FlaxStableDiffusionUpscalePipeline",
           "FlaxStableDiffusionClassifierGuidedPipeline"]
