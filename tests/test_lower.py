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
