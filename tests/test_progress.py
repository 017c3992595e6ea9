"""show_progress: a bar that advances from inside the compiled scan; without it, the program is unchanged."""

from __future__ import annotations

import jax
import numpy as np
import pytest


@pytest.fixture(scope="module")
def toy():
    from sdjax.assets import toy_model_path
    from sdjax.pipelines import FlaxStableDiffusionPipeline

    return FlaxStableDiffusionPipeline.from_pretrained(toy_model_path(), scheduler="pndm")


class Recorder:
    def __init__(self, total):
        self.total, self.n, self.updates, self.closed = total, 0, [], False

    def update(self, k):
        self.n += k
        self.updates.append(self.n)

    def close(self):
        self.closed = True


@pytest.fixture
def bars(monkeypatch):
    from sdjax.pipelines import engine

    made = []

    def bar(total, desc="denoising"):
        made.append(Recorder(total))
        return made[-1]

    monkeypatch.setattr(engine.show_progress, "bar", staticmethod(bar))
    return made


def hlo(pipe, params, settings, ids):
    from sdjax.pipelines.engine import run_jit

    inputs = pipe.text_inputs(ids, None, 5.0, jit=False, mesh=None)
    return run_jit.lower(pipe, settings, inputs, params, jax.random.PRNGKey(0)).as_text()


def test_off_compiles_no_callback_on_compiles_one(toy):
    from sdjax.pipelines import Settings

    pipe, params = toy
    ids = pipe.prepare_inputs(["a red circle"])
    off = hlo(pipe, params, Settings(4, 32, 32), ids)
    assert off == hlo(pipe, params, Settings(4, 32, 32, progress=False), ids)
    assert "callback" not in off
    assert "callback" in hlo(pipe, params, Settings(4, 32, 32, progress=True), ids)


def test_bar_follows_the_steps_and_results_are_unchanged(toy, bars):
    from sdjax import show_progress

    pipe, params = toy
    ids = pipe.prepare_inputs(["a red circle", "a blue square"])
    key = jax.random.PRNGKey(3)
    plain = pipe(ids, params, key, num_inference_steps=6, guidance_scale=5.0)
    assert not bars
    with show_progress():
        shown = pipe(ids, params, key, num_inference_steps=6, guidance_scale=5.0)
    [bar] = bars
    calls = pipe.scheduler.num_model_calls(pipe.scheduler.set_timesteps(6, (1,)))  # PNDM: more calls than steps
    assert bar.total == calls and calls > 6
    assert bar.n == calls and bar.updates == sorted(bar.updates) and bar.closed
    assert len(bar.updates) > 1, "the bar moved during the run, not once at the end"
    np.testing.assert_array_equal(np.asarray(shown.images), np.asarray(plain.images))
    np.testing.assert_array_equal(np.asarray(shown.trajectory.latents), np.asarray(plain.trajectory.latents))
    pipe(ids, params, key, num_inference_steps=6, guidance_scale=5.0)  # after the block: no bar again
    assert len(bars) == 1


def test_on_a_mesh_and_with_pmap(toy, bars):
    from flax.jax_utils import replicate
    from flax.training.common_utils import shard
    from jax.sharding import Mesh

    from sdjax import show_progress

    pipe, params = toy
    n = jax.device_count()
    ids = pipe.prepare_inputs(["a red circle"] * n)
    key = jax.random.PRNGKey(0)
    with show_progress():
        a = pipe(ids, params, key, num_inference_steps=4, mesh=Mesh(np.array(jax.devices()), ("data",)))
        b = pipe(shard(ids), replicate(params), jax.random.split(key, n), num_inference_steps=4, jit=True)
    calls = pipe.scheduler.num_model_calls(pipe.scheduler.set_timesteps(4, (1,)))
    assert [bar.n for bar in bars] == [calls, calls] and all(bar.closed for bar in bars)
    assert np.isfinite(np.asarray(a.images)).all() and np.isfinite(np.asarray(b.images)).all()
