"""Heun (Karras et al. 2022, Algorithm 1 with s_churn = 0): a second-order predictor-corrector in
sigma space. N inference steps make 2N - 1 model calls: even calls are Euler predictor steps, odd
calls evaluate the model at the predicted point and correct with the averaged derivative (the last
step, down to sigma = 0, is a plain Euler step). x̂0 at every call is the prediction from that call's
model output at the point it was evaluated (diffusers' ``pred_original_sample``)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import struct

from .base import (
    BETA_SCHEDULES,
    F32,
    PREDICTION_TYPES,
    SIGMA_KEYS_ALLOWED,
    TIMESTEP_SPACINGS,
    SigmaScheduler,
    clip_or_threshold,
    input_scale,
    take,
    v_coefs,
    x0_from_sigma_space,
)


@struct.dataclass
class HeunState:
    timesteps: jnp.ndarray  # [2N - 1] float32
    sigmas: jnp.ndarray  # [2N] float32: s0, s1, s1, s2, s2, ..., s_{N-1}, s_{N-1}, 0
    noise_levels: jnp.ndarray  # [2N - 1] sigma of each call
    input_scale: jnp.ndarray  # [2N - 1]
    c_out: jnp.ndarray  # [2N - 1]
    c_skip_div: jnp.ndarray  # [2N - 1]
    first_order: jnp.ndarray  # [2N - 1] bool: predictor (Euler) call
    dt_table: jnp.ndarray  # [2N - 1] sigmas[k+1] - sigmas[k] (used on predictor calls)
    prev_derivative: jnp.ndarray  # [*shape] derivative of the last predictor call
    dt: jnp.ndarray  # [] its step size
    prev_sample: jnp.ndarray  # [*shape] the sample it started from


class HeunScheduler(SigmaScheduler):
    order = 2

    name = "heun"
    diffusers_class = "HeunDiscreteScheduler"
    DEFAULTS = dict(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="linear", trained_betas=None,
        prediction_type="epsilon", use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
        clip_sample=False, clip_sample_range=1.0, timestep_spacing="linspace", steps_offset=0,
    )
    ALLOWED = dict(
        beta_schedule=BETA_SCHEDULES, prediction_type=PREDICTION_TYPES, timestep_spacing=TIMESTEP_SPACINGS,
        **SIGMA_KEYS_ALLOWED,
    )

    def set_timesteps(self, num_inference_steps, shape=None, dtype=jnp.float32):
        n = self._check_steps(num_inference_steps)
        if shape is None:
            raise ValueError("heun: set_timesteps needs the sample `shape` for its stored derivative")
        timesteps, sigmas = self._schedule_sigmas(n)
        sigmas = np.concatenate([sigmas, [0.0]]).astype(F32)
        sigmas = np.concatenate([sigmas[:1], sigmas[1:-1].repeat(2), sigmas[-1:]])
        timesteps = np.concatenate([timesteps[:1], np.asarray(timesteps[1:]).repeat(2)]).astype(F32)
        C = len(timesteps)
        s = sigmas[:C]
        c_out, c_skip_div = v_coefs(s)
        f = lambda x: jnp.asarray(np.asarray(x, F32))
        shape = tuple(shape)
        return HeunState(
            timesteps=f(timesteps),
            sigmas=f(sigmas),
            noise_levels=f(s),
            input_scale=f(input_scale(s)),
            c_out=f(c_out),
            c_skip_div=f(c_skip_div),
            first_order=jnp.asarray(np.arange(C) % 2 == 0),
            dt_table=f(sigmas[1 : C + 1] - sigmas[:C]),
            prev_derivative=jnp.zeros(shape, dtype),
            dt=jnp.zeros((), dtype),
            prev_sample=jnp.zeros(shape, dtype),
        )

    def step(self, state, model_output, step_index, sample, key=None, noise=None):
        out_dtype = sample.dtype
        dtype = state.prev_sample.dtype
        x = sample.astype(dtype)
        mo = model_output.astype(dtype)
        k = step_index
        # the sigma the model was evaluated at: sigma_hat on predictor calls, sigma_next on corrector calls
        sigma = take(state.noise_levels, k)
        x0 = x0_from_sigma_space(
            self.config["prediction_type"], mo, x, sigma, take(state.c_out, k), take(state.c_skip_div, k)
        )
        x0 = clip_or_threshold(x0, self.config)
        derivative = (x - x0) / sigma
        first = take(state.first_order, k)
        # predictor: Euler step, remember derivative, dt and sample
        dt1 = take(state.dt_table, k)
        prev1 = x + derivative * dt1
        # corrector: average derivatives, step from the remembered sample
        d2 = (state.prev_derivative + derivative) / 2
        prev2 = state.prev_sample + d2 * state.dt
        prev = jnp.where(first, prev1, prev2)
        new_state = state.replace(
            prev_derivative=jnp.where(first, derivative, state.prev_derivative),
            dt=jnp.where(first, dt1, state.dt),
            prev_sample=jnp.where(first, x, state.prev_sample),
        )
        return new_state, prev.astype(out_dtype), x0.astype(out_dtype)
