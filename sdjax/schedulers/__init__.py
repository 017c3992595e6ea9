"""Schedulers in pure JAX: fixed-shape pytree states, scan-ready steps that return x̂0 at every step.

    sched = get_scheduler("euler", base_config=loaded_scheduler_config)   # or load_scheduler(folder)
    state = sched.set_timesteps(50, latents.shape)
    x = noise * sched.init_noise_sigma(state)
    def body(carry, k):
        state, x = carry
        eps = unet(sched.scale_model_input(state, x, k), state.timesteps[k])
        state, x, x0 = sched.step(state, eps, k, x, key=jax.random.fold_in(key, k))
        return (state, x), x0
    (state, x), x0s = jax.lax.scan(body, (state, x), jnp.arange(sched.num_model_calls(state)))
"""

from .base import ConfigError, Scheduler, SchedulerConfig, SigmaScheduler
from .ddim import DDIMScheduler, DDIMState
from .ddpm import DDPMScheduler, DDPMState
from .dpm_solver import DPMSolverPP2MScheduler, DPMSolverState
from .euler import EulerScheduler, SigmaState
from .euler_ancestral import EulerAncestralScheduler
from .heun import HeunScheduler, HeunState
from .lms import LMSScheduler, LMSState
from .pndm import PNDMScheduler, PNDMState
from .registry import (
    ALIASES,
    DIFFUSERS_CLASSES,
    SCHEDULERS,
    get_scheduler,
    load_scheduler,
    load_scheduler_config,
)

__all__ = [
    "ConfigError", "Scheduler", "SchedulerConfig", "SigmaScheduler",
    "DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "EulerScheduler", "EulerAncestralScheduler",
    "LMSScheduler", "DPMSolverPP2MScheduler", "HeunScheduler",
    "DDPMState", "DDIMState", "PNDMState", "SigmaState", "LMSState", "DPMSolverState", "HeunState",
    "SCHEDULERS", "DIFFUSERS_CLASSES", "ALIASES", "get_scheduler", "load_scheduler", "load_scheduler_config",
]
