"""sdjax: Stable Diffusion in JAX/Flax."""

__version__ = "0.1.0"

from .errors import ConfigError, SdjaxError, WeightsError
