"""`sdjax trajectories` against damage and misuse: verified shards, an exclusive folder, prompts stored once,
edited prompt files refused."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from sdjax import SdjaxError
from sdjax.trajectories import MANIFEST, exclusive, load_shard, read_prompts, run_trajectories

KW = dict(batch_size=2, steps=2, guidance_scale=3.0, seed=0, height=32, width=32, progress=False)


@pytest.fixture(scope="module")
def loaded(tiny_pipeline):
    pipe, params = tiny_pipeline
    return pipe.with_scheduler("ddim"), params


def prompts(n):
    return [f"a {c} {s}" for c in ("red", "blue", "green", "cat", "dog") for s in ("circle", "square")][:n]


def test_a_damaged_shard_is_redone_and_said_so(loaded, tmp_path):
    pipe, params = loaded
    out = tmp_path / "t"
    run_trajectories(pipe, params, prompts(5), out, **KW)
    manifest = json.loads((out / MANIFEST).read_text())
    assert all({"bytes", "sha256"} <= set(s) for s in manifest["shards"])
    reference = load_shard(out / "shard-00001.safetensors")
    path = out / "shard-00001.safetensors"
    path.write_bytes(path.read_bytes()[:-100])  # truncated
    flipped = out / "shard-00002.safetensors"
    data = bytearray(flipped.read_bytes())
    data[-1] ^= 0xFF  # same size, one bit of the data changed
    flipped.write_bytes(bytes(data))
    notes = []
    run_trajectories(pipe, params, prompts(5), out, note=notes.append, **KW)
    assert len(notes) == 2 and "shard-00001.safetensors is damaged" in notes[0] and "bytes" in notes[0]
    assert "checksum" in notes[1]
    again = load_shard(path)
    np.testing.assert_array_equal(again["latents"], reference["latents"])  # redone, exactly
    assert [s["index"] for s in json.loads((out / MANIFEST).read_text())["shards"]] == [0, 1, 2]


def test_a_second_run_into_the_same_folder_is_refused(loaded, tmp_path):
    pipe, params = loaded
    out = tmp_path / "t"
    out.mkdir()
    with exclusive(out):  # as a running `sdjax trajectories` holds it
        with pytest.raises(SdjaxError, match=f"is in use by another sdjax trajectories run \\(pid {os.getpid()} on"):
            run_trajectories(pipe, params, prompts(2), out, **KW)
    assert not (out / MANIFEST).exists()
    run_trajectories(pipe, params, prompts(2), out, **KW)  # free again once the holder is gone


def test_shard_metadata_does_not_grow_with_the_number_of_prompts(loaded, tmp_path):
    pipe, params = loaded
    sizes = {}
    for n in (2, 10):
        out = tmp_path / f"t{n}"
        run_trajectories(pipe, params, prompts(n), out, **(KW | {"steps": 1}))
        shard = load_shard(out / "shard-00000.safetensors")
        assert shard["prompts"] == prompts(n)[:2] and "prompts" not in shard["settings"]
        np.testing.assert_array_equal(shard["prompt_indices"], [0, 1])
        sizes[n] = (out / "shard-00000.safetensors").stat().st_size
        assert json.loads((out / MANIFEST).read_text())["prompts"] == prompts(n)  # the full list, once
    assert sizes[2] == sizes[10]


def test_an_edited_prompts_file_is_refused_naming_the_line(loaded, tmp_path):
    pipe, params = loaded
    file = tmp_path / "prompts.txt"
    file.write_text("a red circle\n\na blue square\na green circle\n")
    original, lines = read_prompts(file)
    assert lines == [1, 3, 4]
    run_trajectories(pipe, params, original, tmp_path / "t", prompt_lines=lines, **(KW | {"steps": 1}))
    file.write_text("a red circle\n\na blue triangle\na green circle\n")
    listed, lines = read_prompts(file)
    with pytest.raises(SdjaxError, match="at line 3: 'a blue square' -> 'a blue triangle'"):
        run_trajectories(pipe, params, listed, tmp_path / "t", prompt_lines=lines, **(KW | {"steps": 1}))
    with pytest.raises(SdjaxError, match="has 3 prompts, the prompts file 2"):
        run_trajectories(pipe, params, original[:2], tmp_path / "t", **(KW | {"steps": 1}))


def test_foreign_folders_and_bad_settings(loaded, tmp_path):
    pipe, params = loaded
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("...")
    with pytest.raises(SdjaxError, match="is not empty \\(thesis.tex\\) and is not an sdjax output folder"):
        run_trajectories(pipe, params, prompts(2), tmp_path / "mine", **KW)
    with pytest.raises(SdjaxError, match="--batch-size must be an integer >= 1"):
        run_trajectories(pipe, params, prompts(2), tmp_path / "t", **(KW | {"batch_size": 0}))
    with pytest.raises(SdjaxError, match="--guidance"):
        run_trajectories(pipe, params, prompts(2), tmp_path / "t", **(KW | {"guidance_scale": float("nan")}))
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "..."
