"""sdjax: Stable Diffusion in JAX/Flax."""

__version__ = "0.1.0"

from .errors import ConfigError, SdjaxError, WeightsError
from .pipeline_stable_diffusion import FlaxStableDiffusionPipeline, FlaxStableDiffusionPipelineOutput, Trajectory
from .schedulers import get_scheduler

__all__ = ["FlaxStableDiffusionPipeline", "FlaxStableDiffusionPipelineOutput", "Trajectory", "get_scheduler",
           "ConfigError", "SdjaxError", "WeightsError"]
