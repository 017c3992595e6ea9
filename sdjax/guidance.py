"""Guidance: how the model's conditional and unconditional predictions combine into the one the sampler uses.

Classifier-free guidance (Ho & Salimans 2022): the UNet runs on the batch [unconditional; conditional]
and the sampler gets eps_u + w (eps_c - eps_u). w = 1 is the conditional model alone, w = 0 the
unconditional one. `guidance_scale` is traced ([B] or a scalar), so changing it never recompiles.

Guidance rescale (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", 3.4;
diffusers' `rescale_noise_cfg`): the guided prediction is scaled to the conditional one's standard deviation
and mixed back with weight `guidance_rescale` (traced too; 0 leaves the guided prediction exactly as it is).

Classifier guidance (Dhariwal & Nichol 2021, for DDIM / epsilon-prediction: eq. 14 and Algorithm 2): a classifier
p(y | x_t, t) trained on noisy samples steers the prediction with eps_hat = eps - s sqrt(1 - alpha_bar_t)
grad_x log p(y | x_t), i.e. the score of p(x_t) p(y | x_t)^s. `classifier_guidance` applies it to a model output
of any parameterization (the output that implies eps_hat at the same x_t); the pipeline that computes the
gradient is `sdjax.pipelines.classifier_guidance`.
"""

from __future__ import annotations

import jax.numpy as jnp


def _per_sample(scale, ndim: int):
    scale = jnp.asarray(scale, jnp.float32)
    return scale.reshape(scale.shape + (1,) * (ndim - scale.ndim)) if scale.ndim else scale


def rescale_noise_cfg(noise_cfg, noise_pred_text, guidance_rescale):
    """diffusers' `rescale_noise_cfg`: r * noise_cfg * std(text) / std(cfg) + (1 - r) * noise_cfg, with the
    standard deviations per sample over all other axes (unbiased, as torch's `std`). Where r is 0 the result is
    noise_cfg itself (no division is looked at), as diffusers, which skips the call for r = 0."""
    axes = tuple(range(1, noise_cfg.ndim))
    std_text = jnp.std(noise_pred_text, axis=axes, keepdims=True, ddof=1)
    std_cfg = jnp.std(noise_cfg, axis=axes, keepdims=True, ddof=1)
    r = _per_sample(guidance_rescale, noise_cfg.ndim)
    mixed = r * (noise_cfg * (std_text / std_cfg)) + (1 - r) * noise_cfg
    return jnp.where(r > 0, mixed, noise_cfg)


def classifier_free_guidance(noise_pred, guidance_scale, guidance_rescale=None):
    """noise_pred [2B, ...] (unconditional half first) -> eps_u + w (eps_c - eps_u), [B, ...] float32;
    then `rescale_noise_cfg` with `guidance_rescale` ([B] or a scalar) when it is given."""
    uncond, cond = jnp.split(noise_pred.astype(jnp.float32), 2)
    w = _per_sample(guidance_scale, uncond.ndim)
    guided = uncond + w * (cond - uncond)
    if guidance_rescale is None:
        return guided
    return rescale_noise_cfg(guided, cond, guidance_rescale)


PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def classifier_guidance(model_output, grad, scale, alpha_bar, prediction_type: str = "epsilon"):
    """model_output [B, ...] shifted so that its implied noise is eps - s sqrt(1 - alpha_bar) grad.

    grad: grad_x log p(y | x_t) [B, ...] at the alpha-space sample x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps.
    scale: s, a number or [B] (traced); alpha_bar: alpha_bar_t of this step (a scalar).
    With x_t fixed, a change d of eps changes v by d / sqrt(alpha_bar) and x0 by -d sqrt(1 - alpha_bar) /
    sqrt(alpha_bar), so every parameterization gets the same x̂0 and eps_hat. Where s == 0 the output is
    `model_output` itself, bit for bit (the same program, any s).
    """
    out = model_output.astype(jnp.float32)
    s = _per_sample(scale, out.ndim)
    alpha_bar = jnp.asarray(alpha_bar, jnp.float32)
    d_eps = -s * jnp.sqrt(1.0 - alpha_bar) * grad.astype(jnp.float32)
    if prediction_type == "epsilon":
        delta = d_eps
    elif prediction_type == "v_prediction":
        delta = d_eps / jnp.sqrt(alpha_bar)
    elif prediction_type == "sample":
        delta = -d_eps * jnp.sqrt(1.0 - alpha_bar) / jnp.sqrt(alpha_bar)
    else:
        raise ValueError(f"prediction_type {prediction_type!r}: use one of {', '.join(PREDICTION_TYPES)}")
    return jnp.where(s == 0, out, out + delta)
