"""Compiling before the weights are read: from_pretrained(abstract=True) and pipe.lower(...).compile().

The program compiled from shapes is the one the later call with real params runs (JAX's cache): the call compiles
nothing. That is what keeps XLA's compile working memory and the weights apart in host memory (bench/memory.py)."""

import contextlib
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from sdjax import InputError
from sdjax.pipelines import FlaxStableDiffusionPipeline

STEPS = 3


@contextlib.contextmanager
def count_compiles():
    """The number of XLA compilations (backend compiles) inside the block, as a one-element list."""
    n = [0]

    def listener(event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            n[0] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield n
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def _call_args(pipe, batch=2):
    ids = pipe.prepare_inputs(["a photo of a cat"] * batch)
    return ids, jax.random.PRNGKey(0)


def test_abstract_params_are_the_loaded_shapes_and_nothing_is_read(tiny_folder, tiny_pipeline, monkeypatch):
    from sdjax.models import modeling_utils

    def refuse(*a, **k):
        raise AssertionError("abstract=True read a weights file")

    monkeypatch.setattr(modeling_utils, "SafetensorsFiles", refuse)
    pipe, shapes = FlaxStableDiffusionPipeline.from_pretrained(tiny_folder, abstract=True)
    assert pipe == tiny_pipeline[0], "the same modules: the same compiled programs"
    real = tiny_pipeline[1]
    assert jax.tree_util.tree_structure(shapes) == jax.tree_util.tree_structure(real)
    for s, r in zip(jax.tree_util.tree_leaves(shapes), jax.tree_util.tree_leaves(real)):
        assert isinstance(s, jax.ShapeDtypeStruct) and s.shape == r.shape and s.dtype == r.dtype
    _, half = FlaxStableDiffusionPipeline.from_pretrained(tiny_folder, abstract=True, param_dtype=jnp.bfloat16)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(half)} == {jnp.dtype(jnp.bfloat16)}


def test_abstract_still_needs_the_weights_file(tiny_folder, tmp_path):
    import shutil

    from sdjax import WeightsError

    folder = tmp_path / "sd"
    shutil.copytree(tiny_folder, folder)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(WeightsError, match="no weights found in .*unet"):
        FlaxStableDiffusionPipeline.from_pretrained(folder, abstract=True)


def test_lower_then_call_compiles_nothing_and_runs_that_program(tiny_folder, tiny_pipeline):
    jax.clear_caches()
    pipe, shapes = FlaxStableDiffusionPipeline.from_pretrained(tiny_folder, abstract=True)
    ids, key = _call_args(pipe)
    lowered = pipe.lower(ids, shapes, key, num_inference_steps=STEPS, guidance_scale=7.5)
    assert isinstance(lowered, jax.stages.Lowered)
    with count_compiles() as n:
        lowered.compile()
    assert n[0] >= 1
    real_pipe, params = tiny_pipeline
    with count_compiles() as n:
        out = real_pipe(ids, params, key, num_inference_steps=STEPS, guidance_scale=3.0)
        jax.block_until_ready(out.images)
    assert n[0] == 0, "the call ran the program compiled from the shapes"
    # and it is the program a plain call compiles: the same numbers
    jax.clear_caches()
    again = real_pipe(ids, params, key, num_inference_steps=STEPS, guidance_scale=3.0)
    np.testing.assert_array_equal(np.asarray(out.images), np.asarray(again.images))
    np.testing.assert_array_equal(np.asarray(out.trajectory.latents), np.asarray(again.trajectory.latents))


def test_lower_on_a_mesh_then_call_compiles_nothing(tiny_pipeline):
    if jax.device_count() < 2:
        pytest.skip("needs several devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    jax.clear_caches()
    pipe, params = tiny_pipeline
    shapes = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
    ids, key = _call_args(pipe)
    pipe.lower(ids, shapes, key, num_inference_steps=STEPS, mesh=mesh, return_trajectory=False).compile()
    with count_compiles() as n:
        jax.block_until_ready(pipe(ids, params, key, num_inference_steps=STEPS, mesh=mesh,
                                   return_trajectory=False).images)
    assert n[0] == 0


def test_lower_checks_arguments_as_the_call_does(tiny_folder):
    pipe, shapes = FlaxStableDiffusionPipeline.from_pretrained(tiny_folder, abstract=True)
    ids, key = _call_args(pipe)
    with pytest.raises(InputError, match="`height` must be a positive multiple"):
        pipe.lower(ids, shapes, key, num_inference_steps=STEPS, height=33)
    bad = dict(shapes, unet=jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape[:-1] + (1,), s.dtype),
                                                   shapes["unet"]))
    with pytest.raises(InputError, match=r"`params\['unet'\]"):
        pipe.lower(ids, bad, key, num_inference_steps=STEPS)


def test_generate_command_compiles_before_it_loads(tiny_folder, tmp_path, capsys, caplog):
    """`sdjax generate` compiles its program from the configs, then loads the weights: the call compiles nothing."""
    from sdjax.cli import main

    jax.clear_caches()
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        code = main(["generate", "--model", str(tiny_folder), "--prompt", "a cat", "--steps", "2",
                     "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 0, err
    assert err.index("compiling ...") < err.index(f"loading {tiny_folder}")
    runs = [r for r in caplog.records if r.getMessage().startswith("Compiling jit(_run)")]
    assert len(runs) == 1, [r.getMessage()[:80] for r in runs]
    assert (tmp_path / "out" / "image-000.png").is_file()


# ---------------------------------------------------------------- reading only what the calls use
def test_vae_encoder_false_leaves_the_encoder_unread_and_makes_the_same_images(tiny_folder, tiny_pipeline,
                                                                                monkeypatch):
    """Text-to-image never encodes: vae_encoder=False does not read the VAE's encoder (the file's tensors are
    passed over), and the call makes the same images as with the full params."""
    from sdjax.io import SafetensorsFiles

    read = []
    original = SafetensorsFiles.__getitem__
    monkeypatch.setattr(SafetensorsFiles, "__getitem__",  # the VAE's tensors that are read
                        lambda self, k: (self._paths[0].parent.name == "vae" and read.append(k)) or original(self, k))
    pipe, params = FlaxStableDiffusionPipeline.from_pretrained(tiny_folder, vae_encoder=False)
    assert set(params["vae"]) == {"decoder", "post_quant_conv"}
    assert read and not [k for k in read if k.startswith(("encoder.", "quant_conv."))]
    assert [k for k in read if k.startswith("decoder.")]
    _, shapes = FlaxStableDiffusionPipeline.from_pretrained(tiny_folder, abstract=True, vae_encoder=False)
    assert jax.tree_util.tree_structure(shapes) == jax.tree_util.tree_structure(params)
    full_pipe, full = tiny_pipeline
    ids, key = _call_args(pipe)
    a = pipe(ids, params, key, num_inference_steps=STEPS)
    b = full_pipe(ids, full, key, num_inference_steps=STEPS)
    np.testing.assert_array_equal(np.asarray(a.images), np.asarray(b.images))
    np.testing.assert_array_equal(np.asarray(a.trajectory.pred_original_samples),
                                  np.asarray(b.trajectory.pred_original_samples))


def test_pipelines_that_encode_refuse_a_vae_without_its_encoder(tiny_folder, tiny_pipeline):
    from sdjax import ConfigError
    from sdjax.models.autoencoder_kl import AutoencoderKL
    from sdjax.pipelines import FlaxStableDiffusionImg2ImgPipeline, FlaxStableDiffusionInpaintPipeline

    for cls in (FlaxStableDiffusionImg2ImgPipeline, FlaxStableDiffusionInpaintPipeline):
        with pytest.raises(InputError, match=f"{cls.__name__} encodes images with the VAE: vae_encoder=False"):
            cls.from_pretrained(tiny_folder, vae_encoder=False)
    with pytest.raises(InputError, match="`vae_encoder` must be True or False, got 'no'"):
        FlaxStableDiffusionPipeline.from_pretrained(tiny_folder, vae_encoder="no")
    pipe, full = tiny_pipeline
    params = dict(full, vae={k: v for k, v in full["vae"].items() if k not in AutoencoderKL.ENCODER})
    img2img = FlaxStableDiffusionImg2ImgPipeline.from_pipe(pipe)
    ids, image = img2img.prepare_inputs(["a cat"], np.zeros((1, 32, 32, 3), np.float32))
    with pytest.raises(InputError, match=r"`params\['vae'\]` has no encoder \(loaded with vae_encoder=False\)"):
        img2img(ids, image, params, jax.random.PRNGKey(0), num_inference_steps=STEPS)
    with pytest.raises(ConfigError, match="skip=.*names no submodule of its params \\(it has: decoder, encoder, "):
        AutoencoderKL.from_pretrained(tiny_folder, subfolder="vae", skip=("encoders",))


def test_tune_cpu_compiler_adds_its_flags_unless_xla_flags_chooses(monkeypatch):
    import os

    from sdjax import compilation

    flags = [f"--{k}={v}" for k, v in compilation.CPU_XLA_FLAGS.items()]
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    assert compilation.tune_cpu_compiler() == flags
    assert os.environ["XLA_FLAGS"] == " ".join(["--xla_force_host_platform_device_count=8", *flags])
    mine = "--xla_cpu_enable_concurrency_optimized_scheduler=true"
    monkeypatch.setenv("XLA_FLAGS", mine)
    assert compilation.tune_cpu_compiler() == [], "the user's own choice wins"
    assert os.environ["XLA_FLAGS"] == mine
    monkeypatch.delenv("XLA_FLAGS")
    assert compilation.tune_cpu_compiler() == flags and os.environ["XLA_FLAGS"] == " ".join(flags)
    monkeypatch.delenv("XLA_FLAGS")
    monkeypatch.setattr(compilation, "TUNED_JAXLIB", ("0.0.",))  # an untested jaxlib: nothing (XLA aborts on
    assert compilation.tune_cpu_compiler() == [] and "XLA_FLAGS" not in os.environ  # flags it does not know)


TUNED_PROBE = """
import sys
from sdjax.compilation import tune_cpu_compiler
if sys.argv[1] == "tuned":
    tune_cpu_compiler()  # before JAX starts its CPU backend, as the sdjax command calls it
import jax, jax.numpy as jnp
from sdjax.assets import toy_model_path
from sdjax.models.autoencoder_kl import AutoencoderKL
vae, p = AutoencoderKL.from_pretrained(toy_model_path(), subfolder="vae", abstract=True, skip=AutoencoderKL.ENCODER)
z = jax.ShapeDtypeStruct((1, vae.latent_channels, 16, 16), jnp.float32)
compiled = jax.jit(lambda p, z: vae.apply({"params": p}, z, method=vae.decode)).lower(p, z).compile()
print(compiled.memory_analysis().temp_size_in_bytes)
"""


def test_tune_cpu_compiler_takes_effect_in_a_fresh_process():
    """In a new process (as `sdjax` runs) XLA knows the flag and follows it: the toy VAE's decode keeps fewer
    temporaries."""
    import os
    import subprocess
    import sys

    def compiled(how):
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
        out = subprocess.run([sys.executable, "-c", TUNED_PROBE, how], env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-2000:]
        return int(out.stdout.split()[-1])

    tuned, default = compiled("tuned"), compiled("default")
    assert tuned < default, (tuned, default)
