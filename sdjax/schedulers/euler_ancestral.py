"""Euler ancestral (k-diffusion ``sample_euler_ancestral``): an Euler step down to sigma_down, then
fresh noise of std sigma_up, so that sigma_down^2 + sigma_up^2 = sigma_next^2."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from .base import (
    BETA_SCHEDULES,
    F32,
    PREDICTION_TYPES,
    TIMESTEP_SPACINGS,
    SigmaScheduler,
    finish_sigmas,
    get_noise,
    input_scale,
    take,
    v_coefs,
)
from .euler import SigmaState, euler_update


class EulerAncestralScheduler(SigmaScheduler):
    """Euler ancestral. ``prediction_type="sample"`` is supported here although diffusers' class raises
    NotImplementedError for it (x̂0 is then the model output itself)."""

    name = "euler_ancestral"
    diffusers_class = "EulerAncestralDiscreteScheduler"
    stochastic = True
    DEFAULTS = dict(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None,
        prediction_type="epsilon", timestep_spacing="linspace", steps_offset=0, rescale_betas_zero_snr=False,
    )
    ALLOWED = dict(beta_schedule=BETA_SCHEDULES, prediction_type=PREDICTION_TYPES, timestep_spacing=TIMESTEP_SPACINGS)

    @classmethod
    def _patch_alphas_cumprod(cls, cfg, alphas_cumprod):
        if cfg.get("rescale_betas_zero_snr"):
            alphas_cumprod = alphas_cumprod.copy()
            alphas_cumprod[-1] = 2.0**-24
        return alphas_cumprod

    def set_timesteps(self, num_inference_steps, shape=None, dtype=jnp.float32):
        n = self._check_steps(num_inference_steps)
        timesteps, sigmas = self._schedule_sigmas(n)
        sigmas = finish_sigmas(sigmas, 0.0)
        s_from, s_to = sigmas[:-1], sigmas[1:]
        sigma_up = (s_to**2 * (s_from**2 - s_to**2) / s_from**2) ** F32(0.5)
        sigma_down = (s_to**2 - sigma_up**2) ** F32(0.5)
        c_out, c_skip_div = v_coefs(s_from)
        f = lambda x: jnp.asarray(np.asarray(x, F32))
        return SigmaState(
            timesteps=f(timesteps),
            sigmas=f(sigmas),
            noise_levels=f(s_from),
            input_scale=f(input_scale(s_from)),
            c_out=f(c_out),
            c_skip_div=f(c_skip_div),
            dt=f(sigma_down - s_from),
            sigma_up=f(sigma_up),
        )

    def step(self, state, model_output, step_index, sample, key=None, noise=None):
        prev, x0 = euler_update(self.config["prediction_type"], state, model_output, step_index, sample)
        z = get_noise(self.name, sample.shape, key, noise)
        prev = prev + z * take(state.sigma_up, step_index)
        return state, prev.astype(sample.dtype), x0.astype(sample.dtype)
