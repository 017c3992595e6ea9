"""sdjax.trajectories.load: stored trajectories as a random-access dataset (plain, and as a grain source)."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from sdjax.errors import SdjaxError

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a red square", "a blue circle"]
STEPS = 3


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from sdjax.assets import toy_model_path
    from sdjax.pipelines import FlaxStableDiffusionPipeline
    from sdjax.trajectories import run_trajectories

    pipe, params = FlaxStableDiffusionPipeline.from_pretrained(toy_model_path(), scheduler="ddim")
    out = tmp_path_factory.mktemp("traj") / "out"
    run_trajectories(pipe, params, PROMPTS, out, batch_size=2, steps=STEPS, progress=False)
    return out


def test_items_are_the_stored_runs(folder):
    from sdjax.trajectories import load, load_shard

    traj = load(folder, verify=True)
    assert len(traj) == len(PROMPTS) and traj.prompt_indices == list(range(len(PROMPTS)))
    shards = [load_shard(folder / f"shard-{b:05d}.safetensors") for b in range(3)]
    for i, prompt in enumerate(PROMPTS):
        shard, column = shards[i // 2], i % 2
        item = traj[i]
        assert item["prompt"] == prompt and item["prompt_index"] == i
        np.testing.assert_array_equal(item["latents"], shard["latents"][:, column])
        np.testing.assert_array_equal(item["pred_original_samples"], shard["pred_original_samples"][:, column])
        np.testing.assert_array_equal(item["timesteps"], shard["timesteps"])
        assert item["seed"] == shard["seeds"][column]
        assert item["latents"].shape[0] == STEPS + 1


def test_examples_one_per_run_and_step(folder):
    from sdjax.trajectories import load

    traj = load(folder)
    ex = traj.examples()
    assert len(ex) == len(PROMPTS) * STEPS
    run = traj[3]
    for step in range(STEPS):
        e = ex[3 * STEPS + step]
        assert e["prompt"] == PROMPTS[3] and e["step"] == step
        np.testing.assert_array_equal(e["x_t"], run["latents"][step])
        np.testing.assert_array_equal(e["next"], run["latents"][step + 1])
        np.testing.assert_array_equal(e["final"], run["latents"][-1])
        np.testing.assert_array_equal(e["x0_hat"], run["pred_original_samples"][step])
        assert e["t"] == run["timesteps"][step] and e["noise_level"] == run["noise_levels"][step]
    # the timesteps go down along a run: x_t is noisier than the final latent
    assert ex[3 * STEPS]["t"] > ex[3 * STEPS + STEPS - 1]["t"]
    with pytest.raises(IndexError):
        ex[len(ex)]


def test_plain_batches_cover_every_example_once(folder):
    from sdjax.trajectories import load

    ex = load(folder).examples()
    batches = list(ex.batches(4, seed=1, drop_remainder=False))
    assert sum(len(b["prompt"]) for b in batches) == len(ex)
    assert batches[0]["x_t"].shape == (4, *ex[0]["x_t"].shape) and batches[0]["x_t"].dtype == np.float32
    seen = sorted((p, int(s)) for b in batches for p, s in zip(b["prompt_index"], b["step"]))
    assert seen == [(p, s) for p in range(len(PROMPTS)) for s in range(STEPS)]
    again = next(ex.batches(4, seed=1))
    np.testing.assert_array_equal(again["x_t"], batches[0]["x_t"])  # the order is a function of the seed


def test_grain_source(folder):
    grain = pytest.importorskip("grain")
    from sdjax.trajectories import load

    ex = load(folder).examples()
    ds = grain.MapDataset.source(ex).shuffle(seed=0).map(lambda e: {k: e[k] for k in ("x_t", "t", "x0_hat")}).batch(5)
    batches = list(ds)
    assert len(batches) == 3 and batches[0]["x_t"].shape == (5, *ex[0]["x_t"].shape)
    total = np.sort(np.concatenate([b["t"] for b in batches]))
    np.testing.assert_array_equal(total, np.sort([ex[k]["t"] for k in range(len(ex))]))
    # picklable, for grain's worker processes
    copy = pickle.loads(pickle.dumps(ex))
    np.testing.assert_array_equal(copy[7]["x_t"], ex[7]["x_t"])


def test_only_recorded_shards_are_read_and_damage_is_named(folder, tmp_path):
    import shutil

    from sdjax.trajectories import load

    partial = tmp_path / "partial"
    shutil.copytree(folder, partial)
    manifest = json.loads((partial / "manifest.json").read_text())
    manifest["shards"] = manifest["shards"][:1]  # as a run stopped after its first shard
    (partial / "manifest.json").write_text(json.dumps(manifest))
    assert load(partial).prompt_indices == [0, 1]

    damaged = tmp_path / "damaged"
    shutil.copytree(folder, damaged)
    with open(damaged / "shard-00001.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\0\0\0\1")
    load(damaged)  # without verify: read as it is
    with pytest.raises(SdjaxError, match="shard-00001.safetensors is damaged"):
        load(damaged, verify=True)
    with pytest.raises(SdjaxError, match="not a trajectories folder"):
        load(tmp_path)
