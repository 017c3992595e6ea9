"""PNDM (Liu et al. 2022): Runge-Kutta warm-up (PRK) then linear multistep (PLMS).

With ``skip_prk_steps=True`` (what Stable Diffusion 1.x configs ship) it is the PLMS sampler: the
second model call re-evaluates at the next timestep and averages (a Heun-like warm-up), so N inference
steps make N + 1 model calls. With ``skip_prk_steps=False`` the first 3 steps are 4-stage Runge-Kutta
steps (12 model calls), so N steps make N + 9 calls.

Every model call is one ``step``; which combination of the current and remembered model outputs a call
uses is decided by per-call tables built in ``set_timesteps``. History (``ets``, the last 4 model
outputs, newest first) lives in a fixed-size buffer.

x̂0: diffusers' PNDM does not return one. We return the standard one-step prediction from the raw model
output of this call at the timestep and sample the model was evaluated at:
(x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t) (or sqrt(a) x_t - sqrt(1-a) v for v-prediction).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import struct

from .base import BETA_SCHEDULES, F32, TIMESTEP_SPACINGS, ConfigError, Scheduler, spacing_error, take
from .ddpm import x0_from_alpha_space

# how a call combines model outputs into the one used for the update
_RAW, _PLMS1, _PLMS2, _PLMS3, _PLMS4, _PRK_LAST = range(6)


@struct.dataclass
class PNDMState:
    timesteps: jnp.ndarray  # [C] int32, one per model call
    noise_levels: jnp.ndarray  # [C] sqrt(1 - alpha_bar_t) at the evaluation timestep
    sqrt_alpha_eval: jnp.ndarray  # [C] for x̂0 at the evaluation point
    sqrt_beta_eval: jnp.ndarray  # [C]
    mode: jnp.ndarray  # [C] int32, one of _RAW.._PRK_LAST
    push: jnp.ndarray  # [C] bool: append this model output to ets
    store_sample: jnp.ndarray  # [C] bool: remember this sample as cur_sample
    use_stored: jnp.ndarray  # [C] bool: update from cur_sample instead of this sample
    acc_keep: jnp.ndarray  # [C] 1.0, or 0.0 to reset the RK accumulator
    acc_coef: jnp.ndarray  # [C] weight of this output in the RK accumulator
    sqrt_alpha_used: jnp.ndarray  # [C] at the timestep the update starts from (v -> eps)
    sqrt_beta_used: jnp.ndarray  # [C]
    sample_coef: jnp.ndarray  # [C] sqrt(alpha_prev / alpha_t)
    alpha_diff: jnp.ndarray  # [C] alpha_prev - alpha_t
    denom: jnp.ndarray  # [C] alpha_t sqrt(1-alpha_prev) + sqrt(alpha_t (1-alpha_t) alpha_prev)
    is_prk: jnp.ndarray  # [C] bool: a Runge-Kutta call (its tables above are by call index)
    # the PLMS update coefficients when the call is the second one of a run (diffusers' counter == 1: it
    # re-evaluates the first step's target and averages, a Heun-like warm-up)
    sqrt_alpha_used_2nd: jnp.ndarray  # [C]
    sqrt_beta_used_2nd: jnp.ndarray  # [C]
    sample_coef_2nd: jnp.ndarray  # [C]
    alpha_diff_2nd: jnp.ndarray  # [C]
    denom_2nd: jnp.ndarray  # [C]
    ets: jnp.ndarray  # [4, *shape] last model outputs, newest first
    cur_sample: jnp.ndarray  # [*shape]
    acc: jnp.ndarray  # [*shape] Runge-Kutta accumulator
    start: jnp.ndarray  # [] int32: the first call run; PLMS counts its warm-up from there


class PNDMScheduler(Scheduler):
    name = "pndm"
    diffusers_class = "PNDMScheduler"
    DEFAULTS = dict(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None,
        skip_prk_steps=False, set_alpha_to_one=False, prediction_type="epsilon", timestep_spacing="leading",
        steps_offset=0,
    )
    ALLOWED = dict(
        beta_schedule=BETA_SCHEDULES, timestep_spacing=TIMESTEP_SPACINGS,
        prediction_type=("epsilon", "v_prediction"),  # as diffusers' PNDM
    )

    def _base_timesteps(self, n):
        cfg, T = self.config, self.num_train_timesteps
        sp = cfg["timestep_spacing"]
        if sp == "linspace":
            return np.linspace(0, T - 1, n).round().astype(np.int64)
        if sp == "leading":
            step_ratio = T // n
            return (np.arange(0, n) * step_ratio).round() + cfg["steps_offset"]
        if sp == "trailing":
            step_ratio = T / n
            return np.round(np.arange(T, 0, -step_ratio))[::-1].astype(np.int64) - 1
        raise spacing_error(self.name, sp)

    def set_timesteps(self, num_inference_steps, shape=None, dtype=jnp.float32):
        n = self._check_steps(num_inference_steps)
        if shape is None:
            raise ValueError("pndm: set_timesteps needs the sample `shape` for its history buffers")
        T = self.num_train_timesteps
        ratio = T // n
        base = self._base_timesteps(n)  # ascending
        skip = self.config["skip_prk_steps"]
        if skip:
            prk = np.array([], np.int64)
            plms = np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1].copy()
        else:
            if len(base) < 4:
                raise ValueError("pndm with skip_prk_steps=False needs num_inference_steps >= 4")
            prk = np.array(base[-4:]).repeat(2) + np.tile(np.array([0, ratio // 2]), 4)
            prk = prk[:-1].repeat(2)[1:-1][::-1].copy()
            plms = base[:-3][::-1].copy()
        timesteps = np.concatenate([prk, plms]).astype(np.int64)
        C = len(timesteps)

        t_used = np.zeros(C, np.int64)
        t_prev = np.zeros(C, np.int64)
        mode = np.zeros(C, np.int32)
        push = np.zeros(C, bool)
        store = np.zeros(C, bool)
        use_stored = np.zeros(C, bool)
        acc_keep = np.ones(C, F32)
        acc_coef = np.zeros(C, F32)
        n_ets = 0
        for c in range(C):
            t_arg = int(timesteps[c])
            if c < len(prk):  # Runge-Kutta stage
                diff = 0 if c % 2 else ratio // 2
                t_prev[c] = t_arg - diff
                t_used[c] = prk[c // 4 * 4]
                use_stored[c] = True
                r = c % 4
                if r == 0:
                    acc_coef[c] = 1 / 6
                    push[c] = store[c] = True
                    n_ets += 1
                elif r in (1, 2):
                    acc_coef[c] = 1 / 3
                else:
                    mode[c] = _PRK_LAST
                    acc_keep[c] = 0.0
            else:  # linear multistep
                t_prev[c] = t_arg - ratio
                t_used[c] = t_arg
                if c != 1:
                    n_ets = min(n_ets, 3) + 1
                    push[c] = True
                else:
                    t_prev[c] = t_arg
                    t_used[c] = t_arg + ratio
                if n_ets == 1 and c == 0:
                    mode[c] = _RAW
                    store[c] = True
                elif n_ets == 1 and c == 1:
                    mode[c] = _PLMS1
                    use_stored[c] = True
                else:
                    mode[c] = {2: _PLMS2, 3: _PLMS3, 4: _PLMS4}[n_ets]

        ac = self.alphas_cumprod
        f = lambda x: jnp.asarray(np.asarray(x, F32))
        coefs = self._update_coefs(t_used, t_prev)
        # every PLMS call as the second of a run: t_used = t + ratio, t_prev = t
        plms = np.arange(C) >= len(prk)
        coefs_2nd = self._update_coefs(np.where(plms, timesteps + ratio, t_used), np.where(plms, timesteps, t_prev))
        a_eval = ac[timesteps]
        shape = tuple(shape)
        return PNDMState(
            timesteps=jnp.asarray(timesteps.astype(np.int32)),
            noise_levels=f((F32(1.0) - a_eval) ** F32(0.5)),
            sqrt_alpha_eval=f(a_eval ** F32(0.5)),
            sqrt_beta_eval=f((F32(1.0) - a_eval) ** F32(0.5)),
            mode=jnp.asarray(mode),
            push=jnp.asarray(push),
            store_sample=jnp.asarray(store),
            use_stored=jnp.asarray(use_stored),
            acc_keep=f(acc_keep),
            acc_coef=f(acc_coef),
            **{k: f(v) for k, v in coefs.items()},
            is_prk=jnp.asarray(~plms),
            **{f"{k}_2nd": f(v) for k, v in coefs_2nd.items()},
            ets=jnp.zeros((4,) + shape, dtype),
            cur_sample=jnp.zeros(shape, dtype),
            acc=jnp.zeros(shape, dtype),
            start=jnp.int32(0),
        )

    def _update_coefs(self, t_used, t_prev) -> dict:
        """The update x_prev = sample_coef x - alpha_diff eps / denom from t_used to t_prev (diffusers' _get_prev_sample)."""
        ac = self.alphas_cumprod
        final = F32(1.0) if self.config["set_alpha_to_one"] else ac[0]
        a_t = ac[np.clip(t_used, 0, len(ac) - 1)]
        a_prev = np.where(t_prev >= 0, ac[np.clip(t_prev, 0, len(ac) - 1)], final).astype(F32)
        beta_t = F32(1.0) - a_t
        beta_prev = F32(1.0) - a_prev
        return dict(sqrt_alpha_used=a_t ** F32(0.5), sqrt_beta_used=beta_t ** F32(0.5),
                    sample_coef=(a_prev / a_t) ** F32(0.5), alpha_diff=a_prev - a_t,
                    denom=a_t * beta_prev ** F32(0.5) + (a_t * beta_t * a_prev) ** F32(0.5))

    def check_start(self, start: int) -> None:
        if start and not self.config["skip_prk_steps"]:
            raise ConfigError("pndm scheduler: starting midway (image-to-image) needs skip_prk_steps=True (PLMS); "
                              "its Runge-Kutta warm-up only runs from the first step")

    def step(self, state, model_output, step_index, sample, key=None, noise=None):
        out_dtype = sample.dtype
        dt = state.ets.dtype
        mo = model_output.astype(dt)
        x = sample.astype(dt)
        k = step_index
        pred = self.config["prediction_type"]

        # x̂0 from this call's own output at its evaluation point
        x0, _ = x0_from_alpha_space(pred, mo, x, take(state.sqrt_alpha_eval, k), take(state.sqrt_beta_eval, k))

        # Runge-Kutta calls follow their tables; PLMS calls count from the first call run (diffusers' counter)
        prk = take(state.is_prk, k)
        c = k - state.start
        push = jnp.where(prk, take(state.push, k), c != 1)
        store = jnp.where(prk, take(state.store_sample, k), c == 0)
        use_stored = jnp.where(prk, take(state.use_stored, k), c == 1)
        plms_mode = jnp.select([c == 0, c == 1, c == 2, c == 3], [_RAW, _PLMS1, _PLMS2, _PLMS3], _PLMS4)
        mode = jnp.where(prk, take(state.mode, k), plms_mode)
        second = ~prk & (c == 1)
        coef = lambda name: jnp.where(second, take(getattr(state, f"{name}_2nd"), k), take(getattr(state, name), k))

        ets = jnp.where(push, jnp.concatenate([mo[None], state.ets[:3]], axis=0), state.ets)
        cur_sample = jnp.where(store, x, state.cur_sample)
        x_used = jnp.where(use_stored, cur_sample, x)
        e1, e2, e3, e4 = ets[0], ets[1], ets[2], ets[3]
        candidates = [
            mo,
            (mo + e1) / 2,
            (3 * e1 - e2) / 2,
            (23 * e1 - 16 * e2 + 5 * e3) / 12,
            (1 / 24) * (55 * e1 - 59 * e2 + 37 * e3 - 9 * e4),
            state.acc + 1 / 6 * mo,
        ]
        eps = jnp.select([mode == i for i in range(len(candidates))], candidates)
        acc = take(state.acc_keep, k) * (state.acc + take(state.acc_coef, k) * mo)

        if pred == "v_prediction":
            eps = coef("sqrt_alpha_used") * eps + coef("sqrt_beta_used") * x_used
        prev = coef("sample_coef") * x_used - coef("alpha_diff") * eps / coef("denom")
        new_state = state.replace(ets=ets, cur_sample=cur_sample, acc=acc)
        return new_state, prev.astype(out_dtype), x0.astype(out_dtype)
