"""Batch generation of trajectories for many prompts, to disk, resumable.

Layout of an output folder:
    manifest.json               settings + the list of completed shards (the source of truth)
    shard-00000.safetensors     latents [T+1,B,C,h,w], pred_original_samples [T,B,C,h,w], timesteps [T],
                                noise_levels [T], seeds [B]; metadata: prompts (JSON), settings (JSON)
    images/00000.png ...        final images (--save-images), named by prompt index

Every file is written to a temp name and renamed. A shard counts only once the manifest lists it, so a
run killed at any point resumes from the last complete shard: no prompt is done twice or skipped.
Each prompt's initial noise comes from its own seed (seed + prompt index), so results do not depend on
the batch size or on where a run was interrupted.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .errors import SdjaxError
from .io import atomic_write, read_json, remove_stale_temp_files, write_json, write_png
from .seeds import initial_noise, loop_key, sample_seeds

MANIFEST = "manifest.json"


def read_prompts(path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise SdjaxError(f"prompts file not found: {path}")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise SdjaxError(f"prompts file {path} has no prompts (expected one prompt per line)")
    return prompts


def initial_latents(pipe, seeds, height: int, width: int) -> np.ndarray:
    """One noise tensor per prompt, from that prompt's own seed (sdjax.seeds)."""
    return initial_noise(seeds, pipe.latent_shape(1, height, width)[1:])


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def save_shard(path: Path, traj, seeds, prompts, settings: dict) -> None:
    from safetensors.numpy import save

    tensors = {
        "latents": np.asarray(traj.latents, np.float32),
        "pred_original_samples": np.asarray(traj.pred_original_samples, np.float32),
        "timesteps": np.asarray(traj.timesteps, np.float32),
        "noise_levels": np.asarray(traj.noise_levels, np.float32),
        "seeds": np.asarray(seeds, np.int64),
    }
    meta = {"prompts": json.dumps(list(prompts)), "settings": json.dumps(settings)}
    data = save(tensors, metadata=meta)
    atomic_write(path, lambda f: f.write(data))


def load_shard(path) -> dict:
    """Read a shard back: arrays plus 'prompts' (list) and 'settings' (dict)."""
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
    out["prompts"] = json.loads(meta.get("prompts", "[]"))
    out["settings"] = json.loads(meta.get("settings", "{}"))
    return out


def run_trajectories(pipe, params, prompts: list[str], out_dir, *, batch_size: int = 4, steps: int = 50,
                     guidance_scale: float = 7.5, seed: int = 0, height: int | None = None,
                     width: int | None = None, save_images: bool = False, settings_extra: dict | None = None,
                     progress: bool = True) -> dict:
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise SdjaxError(f"--batch-size must be >= 1, got {batch_size}")
    height = height or pipe.default_size
    width = width or pipe.default_size
    pipe.check_inputs(height, width, steps)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = {"steps": steps, "guidance_scale": guidance_scale, "seed": seed, "height": height, "width": width,
                "batch_size": batch_size, "scheduler": pipe.scheduler.name, "prompts": prompts,
                **(settings_extra or {})}
    manifest_path = out_dir / MANIFEST
    remove_stale_temp_files(out_dir)  # half-written files of an interrupted run (never read)
    if (out_dir / "images").is_dir():
        remove_stale_temp_files(out_dir / "images")
    if manifest_path.is_file():
        manifest = read_json(manifest_path)
        changed = {k: (manifest["settings"].get(k), v) for k, v in settings.items() if manifest["settings"].get(k) != v}
        if changed:
            desc = "; ".join(f"{k}: {'<list>' if k == 'prompts' else old!r} -> {'<list>' if k == 'prompts' else new!r}"
                             for k, (old, new) in changed.items())
            raise SdjaxError(f"{out_dir} holds a run with other settings ({desc}); use another --out "
                             "or delete that folder to start over")
        done = {s["index"] for s in manifest["shards"] if (out_dir / s["file"]).is_file()}
        manifest["shards"] = [s for s in manifest["shards"] if s["index"] in done]
    else:
        manifest = {"format": "sdjax-trajectories/1", "settings": settings, "shards": []}
        write_json(manifest_path, manifest)
        done = set()

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
                   num_inference_steps=steps, guidance_scale=guidance_scale, height=height, width=width,
                   latents=initial_latents(pipe, seeds, height, width), return_trajectory=True)
        if save_images:
            for i, img in zip(idx, np.asarray(out.images)):
                write_png(out_dir / "images" / f"{i:05d}.png", img)
        save_shard(out_dir / shard_name(b), out.trajectory, seeds, batch_prompts, settings)
        manifest["shards"].append({"index": b, "file": shard_name(b), "prompt_indices": idx})
        manifest["shards"].sort(key=lambda s: s["index"])
        write_json(manifest_path, manifest)  # the shard counts from here on
        bar.update(1)
    bar.close()
    return manifest
