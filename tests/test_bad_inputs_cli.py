"""The careless user at the command line: every case exits 2 with one line naming the argument or file, no
traceback, and nothing outside the command's own output changed."""

from __future__ import annotations

import json
import math
import shutil
import socket
import threading
import time

import numpy as np
import pytest

from .badinput import error_line, run_cli, run_cli_process, snapshot


@pytest.fixture()
def home(tmp_path, tiny_folder):
    """A user's folder: their files, a copy of the tiny model, a prompts file."""
    (tmp_path / "notes.txt").write_text("my notes")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "photo.png").write_bytes(b"not really a png")
    (tmp_path / "prompts.txt").write_text("a red circle\na blue square\n")
    shutil.copytree(tiny_folder, tmp_path / "model")
    return tmp_path


def gen(home, *extra):
    return ["generate", "--model", home / "model", "--prompt", "a cat", "--steps", "2", *extra]


@pytest.mark.parametrize("extra,expect", [
    (("--steps", "0"), "argument --steps: expected a whole number >= 1, got 0"),
    (("--steps", "two"), "argument --steps"),
    (("--height", "0"), "argument --height: expected a whole number >= 1, got 0"),
    (("--width", "-32"), "argument --width"),
    (("--guidance", "nan"), "argument --guidance: expected a finite number"),
    (("--guidance", "inf"), "argument --guidance"),
    (("--num-images", "0"), "argument --num-images"),
    (("--seed", "-1"), "argument --seed"),
    (("--scheduler", "dpm3"), "argument --scheduler"),
    (("--dtype", "int8"), "argument --dtype"),
])
def test_generate_argument_errors(capsys, home, extra, expect):
    run_cli(capsys, gen(home, "--out", home / "out", *extra), home, expect)
    assert not (home / "out").exists(), "nothing written for a refused command"


def test_generate_values_checked_against_the_model(capsys, home):
    run_cli(capsys, gen(home, "--out", home / "o1", "--height", "30"), home, "`height` must be a positive multiple of 4",
            out=home / "o1")
    run_cli(capsys, gen(home, "--out", home / "o2", "--steps", "5000"), home,
            "`num_inference_steps` = 5000 is more than the 1000 timesteps", out=home / "o2")
    run_cli(capsys, gen(home, "--out", home / "o3", "--height", "65536", "--width", "65536"), home,
            "65536x65536 at batch 1 needs about", out=home / "o3")


def test_generate_output_paths(capsys, home):
    run_cli(capsys, gen(home, "--out", home / "notes.txt"), home, "notes.txt is a file, not a folder")
    run_cli(capsys, gen(home, "--out", home / "notes.txt" / "sub"), home, "cannot write into")
    run_cli(capsys, gen(home, "--out", home / "mine"), home, "mine is not empty (photo.png) and is not an sdjax output")
    run_cli(capsys, gen(home, "--out", home / "model"), home, "is not an sdjax output folder")


def test_generate_model_errors(capsys, home):
    missing = ["generate", "--model", home / "nope", "--prompt", "x", "--out", home / "o1"]
    run_cli(capsys, missing, home, "model folder not found", out=home / "o1")
    typo = ["generate", "--model", "runs/typo", "--prompt", "x", "--out", home / "o2"]
    run_cli(capsys, typo, home, "'runs/typo' is not a local folder", out=home / "o2")
    (home / "model" / "vae" / "config.json").write_text(
        json.dumps(json.loads((home / "model" / "vae" / "config.json").read_text()) | {"scaling_factor": "0.18"}))
    run_cli(capsys, gen(home, "--out", home / "o3"), home, "'scaling_factor' = '0.18'", out=home / "o3")


def test_generate_weights_with_nan(capsys, home):
    from safetensors.numpy import load_file, save_file

    path = home / "model" / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(path)
    tensors["conv_in.weight"][0, 0, 0, 0] = math.nan
    save_file(tensors, path)
    run_cli(capsys, gen(home, "--out", home / "o"), home, "conv_in.weight: 1 non-finite", out=home / "o")


def test_generate_rerun_cleans_its_own_stale_images(capsys, home):
    assert run_cli_ok(capsys, gen(home, "--out", home / "g", "--num-images", "3"))
    assert sorted(p.name for p in (home / "g").glob("*.png")) == ["image-000.png", "image-001.png", "image-002.png"]
    assert run_cli_ok(capsys, gen(home, "--out", home / "g", "--num-images", "1"))
    assert sorted(p.name for p in (home / "g").glob("*.png")) == ["image-000.png"]
    assert json.loads((home / "g" / "settings.json").read_text())["images"] == ["image-000.png"]
    # another command's output folder is not taken over
    run_cli(capsys, ["viz", "--model", home / "model", "--prompt", "a cat", "--steps", "2", "--out", home / "g"], home,
            "holds the output of `sdjax generate`")


def run_cli_ok(capsys, argv) -> bool:
    from sdjax.cli import main

    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 0, err[-3000:]
    return True


@pytest.mark.parametrize("content,expect", [
    (b"", "has no prompts"),
    (b"\n   \n", "has no prompts"),
    (b"\xff\xfe\x00\x01binary", "is not UTF-8 text"),
    (b"ok line\n\x00\x01\x02", "holds NUL bytes"),
])
def test_trajectories_prompts_file(capsys, home, content, expect):
    (home / "p.txt").write_bytes(content)
    argv = ["trajectories", "--model", home / "model", "--prompts", home / "p.txt", "--out", home / "t", "--steps", "2"]
    run_cli(capsys, argv, home, expect)
    assert not (home / "t").exists()


def test_trajectories_arguments(capsys, home):
    base = ["trajectories", "--model", home / "model", "--steps", "2"]
    run_cli(capsys, base + ["--prompts", home / "none.txt", "--out", home / "t"], home, "prompts file not found")
    run_cli(capsys, base + ["--prompts", home / "mine", "--out", home / "t"], home, "(it is a folder)")
    run_cli(capsys, base + ["--prompts", home / "prompts.txt", "--out", home / "t", "--batch-size", "0"], home,
            "argument --batch-size")
    run_cli(capsys, base + ["--prompts", home / "prompts.txt", "--out", home / "mine"], home, "is not an sdjax output")
    run_cli(capsys, base + ["--prompts", home / "prompts.txt", "--out", home / "notes.txt"], home, "is a file")


def test_viz_arguments(capsys, home):
    base = ["viz", "--model", home / "model", "--steps", "2"]
    run_cli(capsys, base + ["--prompt", "a cat", "--columns", "0", "--out", home / "v"], home, "argument --columns")
    run_cli(capsys, base + ["--out", home / "v"], home, "--prompt TEXT is required")
    run_cli(capsys, base + ["--shard", home / "none.safetensors", "--out", home / "v"], home,
            "trajectory shard not found", out=home / "v")
    run_cli(capsys, base + ["--shard", home / "notes.txt", "--out", home / "v2"], home, "cannot read trajectory shard",
            out=home / "v2")
    run_cli(capsys, base + ["--prompt", "a cat", "--shard", home / "x", "--out", home / "v3"], home,
            "--prompt and --shard cannot be combined")
    run_cli(capsys, base + ["--prompt", "a cat", "--tokens", "zebra", "--out", home / "v4"], home,
            "--tokens: 'zebra' is not a word of the prompt", out=home / "v4")
    run_cli(capsys, ["demo", "--out", home / "mine"], home, "is not an sdjax output")


@pytest.mark.slow
def test_a_real_process_exits_2_with_one_line(home):
    r = run_cli_process(["generate", "--model", home / "model", "--prompt", "x", "--out", home / "mine"])
    assert r.returncode == 2
    line = error_line(r.stderr, "sdjax generate")
    assert "mine is not empty" in line
    assert "PyTorch was not found" not in r.stderr + r.stdout


@pytest.mark.slow
def test_repo_id_with_an_unresponsive_hub_fails_within_the_timeout(tmp_path):
    """A server that accepts connections and never answers: the repo id fails in seconds, naming it."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(50)
    held = []
    threading.Thread(target=lambda: [held.append(server.accept()) for _ in range(50)], daemon=True).start()
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{server.getsockname()[1]}", "HF_HUB_OFFLINE": "0",
           "SDJAX_HUB_TIMEOUT": "2", "HF_HOME": str(tmp_path / "hf")}
    before = snapshot(tmp_path, tmp_path / "hf")
    t0 = time.time()
    r = run_cli_process(["generate", "--model", "owner/name", "--prompt", "x", "--out", tmp_path / "o"], env, timeout=120)
    seconds = time.time() - t0
    assert r.returncode == 2, r.stderr[-2000:]
    line = error_line(r.stderr, "sdjax generate")
    assert "'owner/name' is not a local folder, and as a Hugging Face Hub repo id it could not be reached" in line
    assert seconds < 40, f"took {seconds:.0f} s"
    after = snapshot(tmp_path, tmp_path / "hf")
    assert {k: v for k, v in after.items() if not k.startswith(str(tmp_path / "o"))} == before
    server.close()


@pytest.fixture()
def pictures(home):
    from PIL import Image

    rgb = (np.random.default_rng(0).uniform(0, 255, (32, 32, 3))).astype(np.uint8)
    Image.fromarray(rgb).save(home / "a.png")
    Image.fromarray(rgb[::-1]).convert("RGBA").save(home / "b.png")  # RGBA is converted
    Image.fromarray(rgb[:30, :30]).save(home / "odd.png")
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    Image.fromarray(mask).save(home / "mask.png")
    Image.fromarray(mask[:16, :16]).save(home / "small_mask.png")
    return home


def edit(home, command, *extra):
    return [command, "--model", home / "model", "--steps", "2", "--out", home / "e", *extra]


@pytest.mark.parametrize("command,extra,expect", [
    ("img2img", ("--image", "none.png", "--prompt", "x"), "image file not found"),
    ("img2img", ("--image", "notes.txt", "--prompt", "x"), "cannot read image"),
    ("img2img", ("--image", "mine", "--prompt", "x"), "(it is a folder)"),
    ("img2img", ("--image", "a.png", "--prompt", "x", "--strength", "0"), "argument --strength: expected a number in (0, 1]"),
    ("img2img", ("--image", "a.png", "--prompt", "x", "--strength", "1.5"), "argument --strength"),
    ("img2img", ("--image", "odd.png", "--prompt", "x"), "--image is 30x30; this model needs sizes that are multiples of 4"),
    ("img2img", ("--image", "a.png", "--prompt", "x", "--strength", "0.1"), "runs no step of 2"),
    ("inpaint", ("--image", "a.png", "--mask", "small_mask.png", "--prompt", "x"), "--mask is 16x16, --image 32x32"),
    ("inpaint", ("--image", "a.png", "--prompt", "x"), "the following arguments are required: --mask"),
    ("merge", ("--image", "a.png"), "give two or more images"),
    ("merge", ("--image", "a.png", "--image", "b.png", "--weights=-1,2"), "--weights must be >= 0"),
    ("merge", ("--image", "a.png", "--image", "b.png", "--weights", "0,0"), "not all 0"),
    ("merge", ("--image", "a.png", "--image", "b.png", "--weights", "1,2,3"), "3 numbers for 2 images"),
    ("merge", ("--image", "a.png", "--image", "b.png", "--weights", "1,x"), "--weights: expected a number"),
    ("merge", ("--image", "a.png", "--image", "b.png", "--image", "a.png", "--series", "3"), "--series merges two"),
    ("merge", ("--image", "a.png", "--image", "odd.png"), "different sizes (30x30, 32x32)"),
])
def test_edit_command_errors(capsys, pictures, command, extra, expect):
    extra = [str(pictures / e) if e.endswith((".png", ".txt")) or e == "mine" else e for e in extra]
    run_cli(capsys, edit(pictures, command, *extra), pictures, expect, out=pictures / "e")
    assert not (pictures / "e").exists() or not any((pictures / "e").glob("*.png"))


def test_edit_commands_write_images_and_settings(capsys, pictures):
    assert run_cli_ok(capsys, edit(pictures, "img2img", "--image", pictures / "b.png", "--prompt", "a cat",
                                   "--strength", "0.5"))
    settings = json.loads((pictures / "e" / "settings.json").read_text())
    assert settings["images"] == ["image-000.png"] and settings["strength"] == 0.5
    assert run_cli_ok(capsys, [*edit(pictures, "inpaint", "--image", pictures / "a.png", "--mask",
                                     pictures / "mask.png", "--prompt", "a dog"), "--out", pictures / "i"])
    assert run_cli_ok(capsys, [*edit(pictures, "merge", "--image", pictures / "a.png", "--image", pictures / "b.png",
                                     "--series", "3"), "--out", pictures / "m"])
    assert {p.name for p in (pictures / "m").iterdir()} >= {"strip.png", "merge.gif", "series-000.png",
                                                            "series-002.png", "settings.json"}
