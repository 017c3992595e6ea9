"""sdjax: Stable Diffusion in JAX/Flax.

Layers (imports go one way): the core (models, schedulers, pipelines, I/O) <- sdjax.viz, sdjax.train <- sdjax.cli.
"""

__version__ = "0.1.0"

from .compilation import enable_compile_cache
from .errors import ConfigError, InputError, NonFiniteError, SdjaxError, WeightsError
from .models import ControlNetModel, NoiseClassifier
from .pipelines import FlaxStableDiffusionControlNetImg2ImgPipeline, FlaxStableDiffusionControlNetPipeline
from .pipelines import (FlaxStableDiffusionClassifierGuidedPipeline, FlaxStableDiffusionImg2ImgPipeline,
                        FlaxStableDiffusionInpaintPipeline, FlaxStableDiffusionMergePipeline, FlaxStableDiffusionPipeline,
                        FlaxStableDiffusionPipelineOutput, FlaxStableDiffusionUpscalePipeline, Trajectory, show_progress)
from .pipelines import FlaxStableDiffusionXLImg2ImgPipeline, FlaxStableDiffusionXLPipeline, load_pipeline
from .schedulers import get_scheduler

__all__ = ["FlaxStableDiffusionPipeline", "FlaxStableDiffusionImg2ImgPipeline", "FlaxStableDiffusionInpaintPipeline",
           "FlaxStableDiffusionMergePipeline", "FlaxStableDiffusionPipelineOutput", "Trajectory", "get_scheduler",
           "enable_compile_cache", "show_progress", "ControlNetModel", "NoiseClassifier", "ConfigError", "InputError",
           "NonFiniteError", "SdjaxError", "WeightsError", "FlaxStableDiffusionXLPipeline",
           "FlaxStableDiffusionXLImg2ImgPipeline", "load_pipeline", "FlaxStableDiffusionControlNetPipeline",
           "FlaxStableDiffusionControlNetImg2ImgPipeline", "FlaxStableDiffusionUpscalePipeline",
           "FlaxStableDiffusionClassifierGuidedPipeline"]
