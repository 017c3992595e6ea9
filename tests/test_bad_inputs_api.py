"""The careless user of the Python API and the loaders: every bad argument is an sdjax error (InputError,
WeightsError, ...) naming it, raised before anything is compiled; never a raw JAX/Flax traceback."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdjax import InputError, NonFiniteError
from sdjax.pipelines.engine import run_jit

SIZE = 32


@pytest.fixture(scope="module")
def loaded(tiny_pipeline):
    return tiny_pipeline


def call(pipe, params, **kw):
    args = dict(prompt_ids=pipe.prepare_inputs(["a cat", "a dog"]), params=params, prng_seed=jax.random.PRNGKey(0),
                num_inference_steps=2, height=SIZE, width=SIZE)
    args.update(kw)
    return pipe(args.pop("prompt_ids"), args.pop("params"), args.pop("prng_seed"), **args)


@pytest.mark.parametrize("kw,match", [
    (dict(height=0), "`height` must be a positive multiple of 4"),
    (dict(width=30), "`width` must be a positive multiple of 4"),
    (dict(height=32.0), "`height` must be a positive multiple"),
    (dict(num_inference_steps=0), "`num_inference_steps` must be an integer >= 1"),
    (dict(num_inference_steps=1001), "more than the 1000 timesteps"),
    (dict(guidance_scale=float("nan")), "`guidance_scale` must be finite"),
    (dict(guidance_scale=[1.0, 2.0, 3.0]), "`guidance_scale` has shape \\(3,\\)"),
    (dict(guidance_scale="high"), "`guidance_scale` must be a number"),
    (dict(latents=np.zeros((2, 4, 8, 8), np.float32)), "`latents` must be a float array of shape \\(2, 4, 16, 16\\)"),
    (dict(latents=np.full((2, 4, 16, 16), np.nan, np.float32)), "`latents` holds NaN or inf"),
    (dict(prompt_ids=np.full((2, 77), 10**6, np.int32)), "token id 1000000, outside the text encoder's vocabulary"),
    (dict(prompt_ids=np.full((2, 77), -1, np.int32)), "token id -1"),
    (dict(prompt_ids=np.zeros((2, 77), np.float32)), "`prompt_ids` must be \\[batch, 77\\] int token ids"),
    (dict(prompt_ids=np.zeros((2, 100), np.int32)), "100 tokens per prompt"),
    (dict(neg_prompt_ids=np.zeros((1, 77), np.int32)), "`neg_prompt_ids` has shape \\(1, 77\\), but prompt_ids has"),
    (dict(prng_seed=0), "`prng_seed` must be a jax.random.PRNGKey"),
    (dict(height=65536, width=65536), "needs about .* GiB for the UNet's attention alone"),
])
def test_pipeline_arguments(loaded, kw, match):
    pipe, params = loaded
    before = run_jit._cache_size()
    with pytest.raises(InputError, match=match):
        call(pipe, params, **kw)
    assert run_jit._cache_size() == before, "refused before compiling anything"


def test_params_that_do_not_fit(loaded):
    pipe, params = loaded
    with pytest.raises(InputError, match="`params` must be the dict from from_pretrained"):
        call(pipe, [params])
    with pytest.raises(InputError, match="`params` has no 'vae'"):
        call(pipe, {k: v for k, v in params.items() if k != "vae"})
    broken = jax.tree_util.tree_map(lambda x: x, params)
    broken["unet"]["conv_in"]["kernel"] = jnp.zeros((3, 3, 4, 7))
    with pytest.raises(InputError, match=r"`params\['unet'\]\['conv_in'\]\['kernel'\]` has shape \(3, 3, 4, 7\), "
                                         r"expected \(3, 3, 4, 32\)"):
        call(pipe, broken)
    with pytest.raises(InputError, match="leading device axis"):
        pipe(pipe.prepare_inputs(["a"] * jax.local_device_count())[:, None], params,
             jax.random.split(jax.random.PRNGKey(0), jax.local_device_count()), num_inference_steps=2,
             height=SIZE, width=SIZE, jit=True)


def test_non_finite_result_names_the_step(loaded):
    pipe, params = loaded
    broken = jax.tree_util.tree_map(lambda x: x, params)
    broken["unet"]["conv_out"]["bias"] = broken["unet"]["conv_out"]["bias"].at[0].set(jnp.inf)
    with pytest.raises(NonFiniteError, match="became NaN or inf at step 1 of the denoising"):
        call(pipe, broken, num_inference_steps=3)
    out = call(pipe, broken, num_inference_steps=3, check_finite=False)  # opt-out: the raw result
    assert not np.isfinite(np.asarray(out.images)).all()
    vae_broken = jax.tree_util.tree_map(lambda x: x, params)
    vae_broken["vae"]["decoder"]["conv_out"]["bias"] = vae_broken["vae"]["decoder"]["conv_out"]["bias"] * math.nan
    with pytest.raises(NonFiniteError, match="VAE decoder produced NaN or inf from finite latents"):
        call(pipe, vae_broken)
