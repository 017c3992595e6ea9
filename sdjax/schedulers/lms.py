"""LMS: linear multistep (Adams-Bashforth, order 4) in sigma space, k-diffusion ``sample_lms``.

The coefficient of each remembered derivative is the integral over [sigma_k, sigma_{k+1}] of its
Lagrange basis polynomial through the last (up to 4) sigmas. diffusers integrates it numerically
with scipy; here the whole [N, 4] table is integrated exactly (polynomial antiderivative, float64) in
``set_timesteps``. The derivatives live in a fixed [4, *shape] buffer, newest first.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import struct
from numpy.polynomial import polynomial as P

from .base import (
    BETA_SCHEDULES,
    F32,
    PREDICTION_TYPES,
    SIGMA_KEYS_ALLOWED,
    TIMESTEP_SPACINGS,
    SigmaScheduler,
    finish_sigmas,
    input_scale,
    take,
    v_coefs,
    x0_from_sigma_space,
)

ORDER = 4


@struct.dataclass
class LMSState:
    timesteps: jnp.ndarray  # [N] float32
    sigmas: jnp.ndarray  # [N + 1]
    noise_levels: jnp.ndarray  # [N]
    input_scale: jnp.ndarray  # [N]
    c_out: jnp.ndarray  # [N]
    c_skip_div: jnp.ndarray  # [N]
    coeffs: jnp.ndarray  # [N, 4] weight of derivatives[j] (j = 0 newest) at each step
    derivatives: jnp.ndarray  # [4, *shape] newest first


def lms_coefficients(sigmas: np.ndarray, order: int = ORDER) -> np.ndarray:
    """[N, order] LMS weights for sigmas of length N + 1 (exact integration of the Lagrange basis)."""
    s = np.asarray(sigmas, np.float64)
    n = len(s) - 1
    table = np.zeros((n, order), np.float64)
    for t in range(n):
        cur = min(t + 1, order)
        for j in range(cur):
            poly = np.array([1.0])
            for k in range(cur):
                if k == j:
                    continue
                den = s[t - j] - s[t - k]
                poly = P.polymul(poly, np.array([-s[t - k] / den, 1.0 / den]))
            anti = P.polyint(poly)
            table[t, j] = P.polyval(s[t + 1], anti) - P.polyval(s[t], anti)
    return table


class LMSScheduler(SigmaScheduler):
    name = "lms"
    diffusers_class = "LMSDiscreteScheduler"
    DEFAULTS = dict(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None,
        use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False, prediction_type="epsilon",
        timestep_spacing="linspace", steps_offset=0,
    )
    ALLOWED = dict(
        beta_schedule=BETA_SCHEDULES, prediction_type=PREDICTION_TYPES, timestep_spacing=TIMESTEP_SPACINGS,
        **SIGMA_KEYS_ALLOWED,
    )

    def set_timesteps(self, num_inference_steps, shape=None, dtype=jnp.float32):
        n = self._check_steps(num_inference_steps)
        if shape is None:
            raise ValueError("lms: set_timesteps needs the sample `shape` for its derivative buffer")
        timesteps, sigmas = self._schedule_sigmas(n)
        sigmas = finish_sigmas(sigmas, 0.0)
        s = sigmas[:-1]
        c_out, c_skip_div = v_coefs(s)
        f = lambda x: jnp.asarray(np.asarray(x, F32))
        return LMSState(
            timesteps=f(timesteps),
            sigmas=f(sigmas),
            noise_levels=f(s),
            input_scale=f(input_scale(s)),
            c_out=f(c_out),
            c_skip_div=f(c_skip_div),
            coeffs=f(lms_coefficients(sigmas)),
            derivatives=jnp.zeros((ORDER,) + tuple(shape), dtype),
        )

    def step(self, state, model_output, step_index, sample, key=None, noise=None):
        out_dtype = sample.dtype
        dt = state.derivatives.dtype
        x = sample.astype(dt)
        mo = model_output.astype(dt)
        k = step_index
        sigma = take(state.noise_levels, k)
        x0 = x0_from_sigma_space(
            self.config["prediction_type"], mo, x, sigma, take(state.c_out, k), take(state.c_skip_div, k)
        )
        derivative = (x - x0) / sigma
        derivs = jnp.concatenate([derivative[None], state.derivatives[: ORDER - 1]], axis=0)
        c = take(state.coeffs, k)
        acc = c[0] * derivs[0]
        for j in range(1, ORDER):
            acc = acc + c[j] * derivs[j]
        prev = x + acc
        return state.replace(derivatives=derivs), prev.astype(out_dtype), x0.astype(out_dtype)
