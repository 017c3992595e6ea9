"""DPM-Solver++(2M) (Lu et al. 2022): second-order multistep solver of the data-prediction ODE,
diffusers' ``DPMSolverMultistepScheduler`` with ``algorithm_type="dpmsolver++"``, ``solver_order=2``.

Samples are VP samples (alpha space: init_noise_sigma = 1, the model sees the sample itself); the
per-step coefficients are computed from the schedule's sigmas in float32 in ``set_timesteps``. The
previous step's x̂0 is the only history. x̂0 is the converted model output (``convert_model_output``)
the solver itself uses, i.e. what diffusers stores in ``scheduler.model_outputs[-1]``.
"""

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
    ConfigError,
    Scheduler,
    clip_or_threshold,
    exponential_sigmas,
    karras_sigmas,
    sigma_to_t,
    spacing_error,
    take,
    train_sigmas,
)


@struct.dataclass
class DPMSolverState:
    timesteps: jnp.ndarray  # [N] int32
    sigmas: jnp.ndarray  # [N + 1] float32 (sigma-space noise levels, last = final)
    noise_levels: jnp.ndarray  # [N] VP noise level sigma_t = sigma / sqrt(sigma^2 + 1)
    alpha_s: jnp.ndarray  # [N] 1 / sqrt(sigma^2 + 1) of the current step
    sigma_s: jnp.ndarray  # [N] sigma * alpha_s
    coef_sample: jnp.ndarray  # [N] sigma_t / sigma_s0
    coef_d0: jnp.ndarray  # [N] alpha_t (exp(-h) - 1)
    coef_d1: jnp.ndarray  # [N] 0.5 alpha_t (exp(-h) - 1) (midpoint) / -alpha_t ((exp(-h)-1)/h + 1) (heun); 0 first order
    inv_r0: jnp.ndarray  # [N] h / h_0 (0 on first-order steps)
    prev_x0: jnp.ndarray  # [*shape] the previous step's converted model output
    start: jnp.ndarray  # [] int32: the first call run (its step is first order, as diffusers' lower_order_nums)


class DPMSolverPP2MScheduler(Scheduler):
    name = "dpm_solver_pp_2m"
    diffusers_class = "DPMSolverMultistepScheduler"
    DEFAULTS = dict(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None,
        solver_order=2, prediction_type="epsilon", thresholding=False, dynamic_thresholding_ratio=0.995,
        sample_max_value=1.0, algorithm_type="dpmsolver++", solver_type="midpoint", lower_order_final=True,
        euler_at_final=False, use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
        use_lu_lambdas=False, use_flow_sigmas=False, flow_shift=1.0, final_sigmas_type="zero",
        lambda_min_clipped=-float("inf"), variance_type=None, timestep_spacing="linspace", steps_offset=0,
        rescale_betas_zero_snr=False, use_dynamic_shifting=False, time_shift_type="exponential",
    )
    ALLOWED = dict(
        beta_schedule=BETA_SCHEDULES, prediction_type=PREDICTION_TYPES, timestep_spacing=TIMESTEP_SPACINGS,
        solver_order=(2,), algorithm_type=("dpmsolver++",), solver_type=("midpoint", "heun"),
        final_sigmas_type=("zero", "sigma_min"), variance_type=(None,), use_lu_lambdas=(False,),
        use_flow_sigmas=(False,), use_dynamic_shifting=(False,), time_shift_type=("exponential",),
        **SIGMA_KEYS_ALLOWED,
    )

    @classmethod
    def _check_config(cls, cfg):
        if not isinstance(cfg["flow_shift"], (int, float)) or isinstance(cfg["flow_shift"], bool):
            raise ConfigError(f"{cls.name} scheduler: flow_shift={cfg['flow_shift']!r} must be a float")

    @classmethod
    def _patch_alphas_cumprod(cls, cfg, alphas_cumprod):
        if cfg.get("rescale_betas_zero_snr"):
            alphas_cumprod = alphas_cumprod.copy()
            alphas_cumprod[-1] = 2.0**-24
        return alphas_cumprod

    def _timesteps(self, n):
        cfg, T = self.config, self.num_train_timesteps
        ac = self.alphas_cumprod
        lambda_t = np.log(np.sqrt(ac)) - np.log(np.sqrt(F32(1.0) - ac))
        clipped_idx = np.searchsorted(lambda_t[::-1], cfg["lambda_min_clipped"], side="left")
        last_timestep = int(T - clipped_idx)
        sp = cfg["timestep_spacing"]
        if sp == "linspace":
            return np.linspace(0, last_timestep - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
        if sp == "leading":
            step_ratio = last_timestep // (n + 1)
            ts = (np.arange(0, n + 1) * step_ratio).round()[::-1][:-1].copy().astype(np.int64)
            return ts + cfg["steps_offset"]
        if sp == "trailing":
            step_ratio = T / n
            return np.arange(last_timestep, 0, -step_ratio).round().copy().astype(np.int64) - 1
        raise spacing_error(self.name, sp)

    def set_timesteps(self, num_inference_steps, shape=None, dtype=jnp.float32):
        n = self._check_steps(num_inference_steps)
        if shape is None:
            raise ValueError("dpm_solver_pp_2m: set_timesteps needs the sample `shape` for its history buffer")
        cfg = self.config
        timesteps = self._timesteps(n)
        sig = train_sigmas(self.alphas_cumprod)
        log_sigmas = np.log(sig)
        if cfg["use_karras_sigmas"] or cfg["use_exponential_sigmas"]:
            flipped = np.flip(sig).copy()
            smin, smax = flipped[-1].item(), flipped[0].item()
            if cfg["use_karras_sigmas"]:
                sigmas = karras_sigmas(smin, smax, n)
            else:
                sigmas = exponential_sigmas(smin, smax, n)
            timesteps = np.array([sigma_to_t(s, log_sigmas) for s in sigmas])
            if cfg["use_karras_sigmas"] and cfg["beta_schedule"] != "squaredcos_cap_v2":
                timesteps = timesteps.round()
        else:
            sigmas = np.interp(timesteps, np.arange(0, len(sig)), sig)
        sigma_last = sig[0] if cfg["final_sigmas_type"] == "sigma_min" else 0.0
        sigmas = np.concatenate([sigmas, [sigma_last]]).astype(F32)
        timesteps = timesteps.astype(np.int64)
        N = len(timesteps)

        one = F32(1.0)
        alpha = (one / (sigmas**2 + one) ** F32(0.5)).astype(F32)
        sigma_vp = (sigmas * alpha).astype(F32)
        with np.errstate(divide="ignore", invalid="ignore"):
            lam = (np.log(alpha) - np.log(sigma_vp)).astype(F32)
            idx = np.arange(N)
            lam_t, lam_s0 = lam[idx + 1], lam[idx]
            lam_s1 = lam[np.maximum(idx - 1, 0)]
            h = (lam_t - lam_s0).astype(F32)
            h0 = (lam_s0 - lam_s1).astype(F32)
            a_t, s_t, s_s0 = alpha[idx + 1], sigma_vp[idx + 1], sigma_vp[idx]
            coef_sample = s_t / s_s0
            em1 = (np.exp(-h) - one).astype(F32)
            coef_d0 = a_t * em1
            if cfg["solver_type"] == "midpoint":
                coef_d1 = F32(0.5) * (a_t * em1)
            else:  # heun: x = ... + alpha_t ((exp(-h) - 1) / h + 1) D1
                coef_d1 = -(a_t * (em1 / h + one))
            r0 = h0 / h
            inv_r0 = one / r0
        lower_order_final = cfg["euler_at_final"] or (cfg["lower_order_final"] and N < 15) or (
            cfg["final_sigmas_type"] == "zero"
        )
        first = idx == 0
        if lower_order_final:
            first = first | (idx == N - 1)
        coef_d1 = np.where(first, F32(0.0), coef_d1).astype(F32)
        inv_r0 = np.where(first, F32(0.0), inv_r0).astype(F32)
        f = lambda x: jnp.asarray(np.asarray(x, F32))
        return DPMSolverState(
            timesteps=jnp.asarray(timesteps.astype(np.int32)),
            sigmas=f(sigmas),
            noise_levels=f(sigma_vp[:N]),
            alpha_s=f(alpha[:N]),
            sigma_s=f(sigma_vp[:N]),
            coef_sample=f(coef_sample),
            coef_d0=f(coef_d0),
            coef_d1=f(coef_d1),
            inv_r0=f(inv_r0),
            prev_x0=jnp.zeros(tuple(shape), dtype),
            start=jnp.int32(0),
        )

    def step(self, state, model_output, step_index, sample, key=None, noise=None):
        out_dtype = sample.dtype
        dtype = state.prev_x0.dtype
        x = sample.astype(dtype)
        mo = model_output.astype(dtype)
        k = step_index
        alpha_s, sigma_s = take(state.alpha_s, k), take(state.sigma_s, k)
        pred = self.config["prediction_type"]
        if pred == "epsilon":
            x0 = (x - sigma_s * mo) / alpha_s
        elif pred == "v_prediction":
            x0 = alpha_s * x - sigma_s * mo
        else:
            x0 = mo
        x0 = clip_or_threshold(x0, self.config)
        m0, m1 = x0, state.prev_x0
        second_order = k != state.start  # no earlier output to extrapolate from at the first call run
        d1 = jnp.where(second_order, take(state.inv_r0, k), 0.0) * (m0 - m1)
        prev = take(state.coef_sample, k) * x - take(state.coef_d0, k) * m0 - take(state.coef_d1, k) * d1
        return state.replace(prev_x0=x0), prev.astype(out_dtype), x0.astype(out_dtype)
