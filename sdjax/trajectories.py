"""Batch generation of trajectories for many prompts, to disk, resumable.

Layout of an output folder:
    manifest.json               settings, the prompts (once), and the completed shards with their size and
                                SHA-256 (the source of truth)
    shard-00000.safetensors     latents [T+1,B,C,h,w], pred_original_samples [T,B,C,h,w], timesteps [T],
                                noise_levels [T], seeds [B], prompt_indices [B]; metadata: this shard's own
                                prompts (JSON) and the settings (JSON)
    images/00000.png ...        final images (--save-images), named by prompt index
    .lock                       held (flock) by the run writing the folder; names its process

Every file is written to a temp name and renamed. A shard counts only once the manifest lists it with its
size and checksum; a resumed run verifies every listed shard and redoes a damaged one, so a run killed at
any point resumes from the last complete shard: no prompt is done twice or skipped. Each prompt's initial
noise comes from its own seed (seed + prompt index), so results do not depend on the batch size or on where
a run was interrupted. A second run into the same folder is refused while the first holds the lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import sys
import time
from pathlib import Path

import numpy as np

from .errors import SdjaxError
from .io import atomic_write, check_output_dir, read_json, remove_stale_temp_files, write_json, write_png
from .seeds import initial_noise, loop_key, sample_seeds

MANIFEST = "manifest.json"
LOCK = ".lock"
FORMAT = "sdjax-trajectories/2"


def read_prompts(path) -> tuple[list[str], list[int]]:
    """(prompts, their line numbers in the file): one prompt per non-empty line, UTF-8."""
    path = Path(path)
    if not path.is_file():
        raise SdjaxError(f"prompts file not found: {path}" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise SdjaxError(f"prompts file {path} is not UTF-8 text (byte {e.start}: {e.reason}); expected one "
                         "prompt per line") from None
    if "\x00" in text:
        raise SdjaxError(f"prompts file {path} holds NUL bytes: a binary file, not one prompt per line")
    prompts, lines = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            prompts.append(line.strip())
            lines.append(number)
    if not prompts:
        raise SdjaxError(f"prompts file {path} has no prompts (expected one prompt per line)")
    return prompts, lines


def initial_latents(pipe, seeds, height: int, width: int) -> np.ndarray:
    """One noise tensor per prompt, from that prompt's own seed (sdjax.seeds)."""
    return initial_noise(seeds, pipe.latent_shape(1, height, width)[1:])


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def save_shard(path: Path, traj, seeds, prompts, prompt_indices, settings: dict) -> dict:
    """Write one shard (atomically); returns its manifest entry's size and SHA-256."""
    from safetensors.numpy import save

    tensors = {
        "latents": np.asarray(traj.latents, np.float32),
        "pred_original_samples": np.asarray(traj.pred_original_samples, np.float32),
        "timesteps": np.asarray(traj.timesteps, np.float32),
        "noise_levels": np.asarray(traj.noise_levels, np.float32),
        "seeds": np.asarray(seeds, np.int64),
        "prompt_indices": np.asarray(prompt_indices, np.int64),
    }
    meta = {"prompts": json.dumps(list(prompts)), "settings": json.dumps(settings)}
    data = save(tensors, metadata=meta)
    atomic_write(path, lambda f: f.write(data))
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def load_shard(path) -> dict:
    """Read a shard back: arrays plus 'prompts' (this shard's, list) and 'settings' (dict)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise SdjaxError(f"trajectory shard not found: {path}")
    try:
        with safe_open(str(path), framework="numpy") as f:
            out = {k: f.get_tensor(k) for k in f.keys()}
            meta = f.metadata() or {}
    except Exception as e:
        raise SdjaxError(f"cannot read trajectory shard {path}: {type(e).__name__}: {e}") from None
    missing = {"latents", "pred_original_samples", "timesteps"} - set(out)
    if missing:
        raise SdjaxError(f"{path} is not a sdjax trajectory shard (missing {sorted(missing)})")
    try:
        out["prompts"] = json.loads(meta.get("prompts", "[]"))
        out["settings"] = json.loads(meta.get("settings", "{}"))
    except json.JSONDecodeError as e:
        raise SdjaxError(f"{path}: its metadata is not valid JSON ({e})") from None
    return out


def verify_shard(path: Path, entry: dict) -> str | None:
    """None if the file has the size and checksum the manifest recorded, else what is wrong."""
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if size != entry.get("bytes"):
        return f"{size} bytes, the manifest says {entry.get('bytes')}"
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    if digest.hexdigest() != entry.get("sha256"):
        return "its checksum differs from the manifest's"
    return None


@contextlib.contextmanager
def exclusive(out_dir: Path, what: str = "sdjax trajectories"):
    """Hold an exclusive lock on `out_dir` for the duration (a second run fails at once, naming the holder)."""
    path = out_dir / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            raise SdjaxError(f"{out_dir} is in use by another {what} run ({holder}); wait for it to finish, "
                             "or use another --out") from None
        info = f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, info.encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


def run_trajectories(pipe, params, prompts: list[str], out_dir, *, batch_size: int = 4, steps: int = 50,
                     guidance_scale: float = 7.5, seed: int = 0, height: int | None = None,
                     width: int | None = None, save_images: bool = False, settings_extra: dict | None = None,
                     progress: bool = True, prompt_lines: list[int] | None = None, overwrite: bool = False,
                     note=_note) -> dict:
    """Generate and store the trajectories of `prompts` in `out_dir` (resuming a run there). Returns the manifest.

    prompt_lines: the prompts' line numbers in their file (named when an edited file is refused).
    overwrite: write into a non-empty folder that is not a trajectories folder.
    """
    from tqdm.auto import tqdm

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise SdjaxError(f"--batch-size must be an integer >= 1, got {batch_size!r}")
    height = pipe.default_size if height is None else height
    width = pipe.default_size if width is None else width
    pipe.check_inputs(height, width, steps, batch_size)
    pipe.check_guidance(guidance_scale, (1,), "--guidance")
    out_dir = Path(out_dir)
    check_output_dir(out_dir, "sdjax trajectories", overwrite=overwrite, own_files=(MANIFEST, LOCK))
    settings = {"steps": steps, "guidance_scale": guidance_scale, "seed": seed, "height": height, "width": width,
                "batch_size": batch_size, "scheduler": pipe.scheduler.name, **(settings_extra or {})}
    with exclusive(out_dir):
        return _run_locked(pipe, params, prompts, out_dir, settings, save_images, progress, prompt_lines, note, tqdm)


def _run_locked(pipe, params, prompts, out_dir, settings, save_images, progress, prompt_lines, note, tqdm):
    manifest_path = out_dir / MANIFEST
    remove_stale_temp_files(out_dir)  # half-written files of an interrupted run (never read)
    if (out_dir / "images").is_dir():
        remove_stale_temp_files(out_dir / "images")
    if manifest_path.is_file():
        manifest = read_json(manifest_path, "trajectories manifest")
        if manifest.get("format") != FORMAT:
            raise SdjaxError(f"{manifest_path} is a {manifest.get('format')!r} manifest; this sdjax writes {FORMAT!r}: "
                             "use another --out")
        changed = {k: (manifest["settings"].get(k), v) for k, v in settings.items() if manifest["settings"].get(k) != v}
        if changed:
            desc = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
            raise SdjaxError(f"{out_dir} holds a run with other settings ({desc}); use another --out "
                             "or delete that folder to start over")
        _check_same_prompts(manifest["prompts"], prompts, prompt_lines, out_dir)
        kept = []
        for entry in manifest["shards"]:
            problem = verify_shard(out_dir / entry["file"], entry)
            if problem is None:
                kept.append(entry)
            else:
                note(f"{entry['file']} is damaged ({problem}): it is generated again")
        manifest["shards"] = kept
        write_json(manifest_path, manifest)
    else:
        manifest = {"format": FORMAT, "settings": settings, "prompts": list(prompts), "shards": []}
        write_json(manifest_path, manifest)
    done = {s["index"] for s in manifest["shards"]}

    batch_size, seed, steps = settings["batch_size"], settings["seed"], settings["steps"]
    height, width = settings["height"], settings["width"]
    n_batches = (len(prompts) + batch_size - 1) // batch_size
    if save_images:
        (out_dir / "images").mkdir(exist_ok=True)
    bar = tqdm(total=n_batches, initial=len(done), desc="trajectories", unit="batch", disable=not progress)
    for b in range(n_batches):
        if b in done:
            continue
        idx = list(range(b * batch_size, min((b + 1) * batch_size, len(prompts))))
        batch_prompts = [prompts[i] for i in idx]
        seeds = sample_seeds(seed, idx)
        out = pipe(pipe.prepare_inputs(batch_prompts), params, loop_key(seed, b),
                   num_inference_steps=steps, guidance_scale=settings["guidance_scale"], height=height, width=width,
                   latents=initial_latents(pipe, seeds, height, width), return_trajectory=True)
        if save_images:
            for i, img in zip(idx, np.asarray(out.images)):
                write_png(out_dir / "images" / f"{i:05d}.png", img)
        check = save_shard(out_dir / shard_name(b), out.trajectory, seeds, batch_prompts, idx, settings)
        manifest["shards"].append({"index": b, "file": shard_name(b), "prompt_indices": idx, **check})
        manifest["shards"].sort(key=lambda s: s["index"])
        write_json(manifest_path, manifest)  # the shard counts from here on
        bar.update(1)
    bar.close()
    return manifest


def _check_same_prompts(saved: list[str], prompts: list[str], lines: list[int] | None, out_dir: Path) -> None:
    for k, (old, new) in enumerate(zip(saved, prompts)):
        if old != new:
            where = f"line {lines[k]}" if lines else f"prompt {k + 1}"
            raise SdjaxError(f"the prompts differ from the run in {out_dir} at {where}: {old!r} -> {new!r}; "
                             "use another --out for new prompts")
    if len(saved) != len(prompts):
        raise SdjaxError(f"the run in {out_dir} has {len(saved)} prompts, the prompts file {len(prompts)}; "
                         "use another --out for new prompts")
