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
def exclusive(out_dir: Path, what: str = "sdjax trajectories", lock: str = LOCK):
    """Hold an exclusive lock on `out_dir` for the duration (a second run fails at once, naming the holder)."""
    path = out_dir / lock
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
                     mesh=None, note=_note) -> dict:
    """Generate and store the trajectories of `prompts` in `out_dir` (resuming a run there). Returns the manifest
    (with "stopped": True if SIGTERM stopped the run early: every shard written is complete; rerun to resume).

    prompt_lines: the prompts' line numbers in their file (named when an edited file is refused).
    overwrite: write into a non-empty folder that is not a trajectories folder.
    mesh: split each batch over these devices (e.g. this process's local devices).

    In a multi-process JAX run (after `jax.distributed.initialize()`), every process calls this with the same
    arguments and the same `out_dir` (a shared file system): batch b is done by process b % process_count
    on its own devices, each process records its shards in `manifest-p<K>.json`, and at the end process 0
    merges them into manifest.json. The shards, and the result, are those of a one-process run.
    """
    import jax
    from tqdm.auto import tqdm

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise SdjaxError(f"--batch-size must be an integer >= 1, got {batch_size!r}")
    height = pipe.default_size if height is None else height
    width = pipe.default_size if width is None else width
    pipe.check_inputs(height, width, steps, batch_size)
    pipe.check_guidance(guidance_scale, (1,), "--guidance")
    if mesh is not None and batch_size % mesh.size:
        raise SdjaxError(f"--batch-size {batch_size} must be divisible by the {mesh.size} devices it is split over")
    out_dir = Path(out_dir)
    rank, count = jax.process_index(), jax.process_count()
    check_output_dir(out_dir, "sdjax trajectories", overwrite=overwrite, own_files=(MANIFEST, LOCK, _part_name(0)))
    settings = {"steps": steps, "guidance_scale": guidance_scale, "seed": seed, "height": height, "width": width,
                "batch_size": batch_size, "scheduler": pipe.scheduler.name, **(settings_extra or {})}
    run = _Run(pipe, params, prompts, out_dir, settings, save_images, progress and rank == 0, prompt_lines, note,
               mesh, rank, count)
    if count == 1:
        with exclusive(out_dir):
            return run.go(tqdm)
    from jax.experimental.multihost_utils import sync_global_devices

    if rank == 0:  # before anyone writes: half-written files of an interrupted run go
        run.remove_stale()
    sync_global_devices("sdjax trajectories: start")
    with exclusive(out_dir, lock=f"{LOCK}-p{rank}"):
        manifest = run.go(tqdm)
    sync_global_devices("sdjax trajectories: end")
    if rank == 0:
        manifest = run.merge()
    sync_global_devices("sdjax trajectories: merged")
    return read_json(out_dir / MANIFEST, "trajectories manifest") | ({"stopped": True} if manifest.get("stopped") else {})


def _part_name(rank: int) -> str:
    return f"manifest-p{rank}.json"


class _Run:
    """One process's share of a trajectories run (all of it in a one-process run)."""

    def __init__(self, pipe, params, prompts, out_dir, settings, save_images, progress, prompt_lines, note, mesh,
                 rank, count):
        self.pipe, self.params, self.prompts, self.out_dir, self.settings = pipe, params, prompts, out_dir, settings
        self.save_images, self.progress, self.lines, self.note, self.mesh = save_images, progress, prompt_lines, note, mesh
        self.rank, self.count = rank, count
        self.n_batches = (len(prompts) + settings["batch_size"] - 1) // settings["batch_size"]

    def remove_stale(self):
        remove_stale_temp_files(self.out_dir)
        if (self.out_dir / "images").is_dir():
            remove_stale_temp_files(self.out_dir / "images")

    def mine(self, b: int) -> bool:
        return b % self.count == self.rank

    def _read(self, path: Path) -> dict:
        manifest = read_json(path, "trajectories manifest")
        if manifest.get("format") != FORMAT:
            raise SdjaxError(f"{path} is a {manifest.get('format')!r} manifest; this sdjax writes {FORMAT!r}: "
                             "use another --out")
        saved = manifest.get("settings", {})
        changed = {k: (saved.get(k), v) for k, v in self.settings.items() if saved.get(k) != v}
        if changed:
            desc = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
            raise SdjaxError(f"{self.out_dir} holds a run with other settings ({desc}); use another --out "
                             "or delete that folder to start over")
        _check_same_prompts(manifest["prompts"], self.prompts, self.lines, self.out_dir)
        return manifest

    def known_shards(self) -> dict:
        """Every shard a manifest or a process's part lists (a resumed run may use another process count)."""
        entries = {}
        for path in [self.out_dir / MANIFEST, *sorted(self.out_dir.glob(_part_name("*")))]:
            if path.is_file():
                for entry in self._read(path)["shards"]:
                    entries.setdefault(entry["index"], entry)
        return entries

    def go(self, tqdm) -> dict:
        from .preemption import stop_requested

        out_dir, settings, pipe = self.out_dir, self.settings, self.pipe
        if self.count == 1:
            self.remove_stale()
        shards = []
        for b, entry in sorted(self.known_shards().items()):
            problem = verify_shard(out_dir / entry["file"], entry)
            if problem is None:
                shards.append(entry)
            elif self.mine(b):
                self.note(f"{entry['file']} is damaged ({problem}): it is generated again")
        manifest = {"format": FORMAT, "settings": settings, "prompts": list(self.prompts), "shards": shards}
        path = out_dir / (MANIFEST if self.count == 1 else _part_name(self.rank))
        write_json(path, manifest)
        if self.count > 1 and self.rank == 0 and not (out_dir / MANIFEST).is_file():
            write_json(out_dir / MANIFEST, manifest | {"shards": []})  # the folder says what it is from the start
        done = {s["index"] for s in shards}

        batch_size, seed, steps = settings["batch_size"], settings["seed"], settings["steps"]
        height, width = settings["height"], settings["width"]
        if self.save_images:
            (out_dir / "images").mkdir(exist_ok=True)
        todo = [b for b in range(self.n_batches) if b not in done and self.mine(b)]
        bar = tqdm(total=self.n_batches, initial=len(done), desc="trajectories", unit="batch", disable=not self.progress)
        with stop_requested() as stop:
            for b in todo:
                if stop:
                    manifest["stopped"] = True
                    break
                idx = list(range(b * batch_size, min((b + 1) * batch_size, len(self.prompts))))
                batch_prompts = [self.prompts[i] for i in idx]
                seeds = sample_seeds(seed, idx)
                latents = initial_latents(pipe, seeds, height, width)
                ids = pipe.prepare_inputs(batch_prompts)
                mesh = self.mesh if self.mesh is not None and len(idx) % self.mesh.size == 0 else None
                out = pipe(ids, self.params, loop_key(seed, b), num_inference_steps=steps,
                           guidance_scale=settings["guidance_scale"], height=height, width=width, latents=latents,
                           return_trajectory=True, mesh=mesh)
                if self.save_images:
                    for i, img in zip(idx, np.asarray(out.images)):
                        write_png(out_dir / "images" / f"{i:05d}.png", img)
                check = save_shard(out_dir / shard_name(b), out.trajectory, seeds, batch_prompts,
                                   idx, settings)
                manifest["shards"].append({"index": b, "file": shard_name(b), "prompt_indices": idx, **check})
                manifest["shards"].sort(key=lambda s: s["index"])
                write_json(path, {k: v for k, v in manifest.items() if k != "stopped"})  # the shard counts from here
                bar.update(1)
        bar.close()
        return manifest

    def merge(self) -> dict:
        """Process 0, after every process finished: the parts' shards into manifest.json, then the parts go."""
        entries = self.known_shards()
        manifest = {"format": FORMAT, "settings": self.settings, "prompts": list(self.prompts),
                    "shards": [entries[b] for b in sorted(entries)]}
        write_json(self.out_dir / MANIFEST, manifest)
        for part in self.out_dir.glob(_part_name("*")):
            part.unlink()
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


# ------------------------------------------------------------------------------------------------- reading
def load(out_dir, verify: bool = False) -> "Trajectories":
    """The trajectories in a `sdjax trajectories` folder, for reading (e.g. as a student's training data).

    verify: check every shard's size and SHA-256 against the manifest first (reads every byte once).
    """
    return Trajectories(out_dir, verify=verify)


class Trajectories:
    """Random access to a trajectories folder's stored runs, one per prompt, over memory-mapped shards: an item
    is read from the files when it is asked for (only its own slice), so a folder larger than memory is fine.

        traj = sdjax.trajectories.load("runs/traj")
        len(traj), traj.prompts[0]
        traj[i]             # the i-th stored run: latents [T+1,C,h,w], pred_original_samples [T,C,h,w],
                            # timesteps [T], noise_levels [T], seed, prompt, prompt_index
        traj.examples()     # one example per (run, step): x_t, t, noise_level, x0_hat, final, prompt, ...

    Both are random-access sources (len + getitem), which is what `grain.MapDataset.source` takes:
        grain.MapDataset.source(traj.examples()).shuffle(seed=0).batch(64)
    `traj.examples().batches(64, seed=0)` is the same as a plain iterator of numpy batches.

    Complete runs only: a shard the manifest (or, in a multi-process run still going, a process's part)
    does not list is not read. When the run is complete, item i is prompt i.
    """

    def __init__(self, out_dir, verify: bool = False):
        self.out_dir = Path(out_dir)
        path = self.out_dir / MANIFEST
        if not path.is_file():
            raise SdjaxError(f"{self.out_dir} is not a trajectories folder (no {MANIFEST}; write one with "
                             "`sdjax trajectories`)")
        manifest = read_json(path, "trajectories manifest")
        if manifest.get("format") != FORMAT:
            raise SdjaxError(f"{path} is a {manifest.get('format')!r} manifest; this sdjax reads {FORMAT!r}")
        entries = {s["index"]: s for s in manifest["shards"]}
        for part in sorted(self.out_dir.glob(_part_name("*"))):
            for s in read_json(part, "trajectories manifest").get("shards", []):
                entries.setdefault(s["index"], s)
        self.settings, self.prompts = manifest["settings"], list(manifest["prompts"])
        self._files, self._where = [], []
        for b in sorted(entries):
            entry = entries[b]
            if verify and (problem := verify_shard(self.out_dir / entry["file"], entry)) is not None:
                raise SdjaxError(f"{self.out_dir / entry['file']} is damaged ({problem}); rerun `sdjax trajectories` "
                                 "on this folder to redo it")
            self._files.append(self.out_dir / entry["file"])
            self._where += [(len(self._files) - 1, column, p) for column, p in enumerate(entry["prompt_indices"])]
        self.prompt_indices = [p for _, _, p in self._where]
        self._handles = {}
        self.num_steps = int(self.settings["steps"])

    def __len__(self) -> int:
        return len(self._where)

    def __getstate__(self):  # picklable (grain's worker processes): the file handles are opened again there
        return self.__dict__ | {"_handles": {}}

    def _shard(self, f: int):
        from safetensors import safe_open

        if f not in self._handles:
            try:
                self._handles[f] = safe_open(str(self._files[f]), framework="numpy")
            except Exception as e:
                raise SdjaxError(f"cannot read trajectory shard {self._files[f]}: {type(e).__name__}: {e}") from None
        return self._handles[f]

    def _column(self, f: int, name: str, column: int, step=slice(None)):
        sliced = self._shard(f).get_slice(name)
        return sliced[step, column] if name in ("latents", "pred_original_samples") else sliced[column]

    def __getitem__(self, i: int) -> dict:
        f, column, prompt_index = self._where[i]
        shard = self._shard(f)
        return {
            "latents": self._column(f, "latents", column),
            "pred_original_samples": self._column(f, "pred_original_samples", column),
            "timesteps": shard.get_tensor("timesteps"),
            "noise_levels": shard.get_tensor("noise_levels"),
            "seed": int(self._column(f, "seeds", column)),
            "prompt": self.prompts[prompt_index],
            "prompt_index": prompt_index,
        }

    def examples(self) -> "TrajectoryExamples":
        return TrajectoryExamples(self)


class TrajectoryExamples:
    """One training example per (stored run, denoising step): for a distillation- or consistency-style loop.

    example k = run k // T, step k % T:
        x_t          the latent entering that step (latents[step])          [C,h,w] float32
        t            its timestep; noise_level: its noise level (sigma)    float32
        x0_hat       the model's one-step prediction of the clean latent   [C,h,w]
        next         the latent after the step (latents[step + 1])        [C,h,w]
        final        the run's final latent (latents[-1])                 [C,h,w]
        step, prompt, prompt_index
    """

    def __init__(self, trajectories: Trajectories):
        self.trajectories = trajectories
        self.num_steps = trajectories.num_steps

    def __len__(self) -> int:
        return len(self.trajectories) * self.num_steps

    def __getitem__(self, k: int) -> dict:
        run, step = divmod(int(k), self.num_steps)
        if not 0 <= run < len(self.trajectories):
            raise IndexError(f"example {k} of {len(self)}")
        traj = self.trajectories
        f, column, prompt_index = traj._where[run]
        shard = traj._shard(f)
        latents = traj._column(f, "latents", column, slice(step, step + 2))
        return {
            "x_t": latents[0],
            "next": latents[1],
            "final": traj._column(f, "latents", column, slice(self.num_steps, self.num_steps + 1))[0],
            "x0_hat": traj._column(f, "pred_original_samples", column, slice(step, step + 1))[0],
            "t": shard.get_slice("timesteps")[step],
            "noise_level": shard.get_slice("noise_levels")[step],
            "step": step,
            "prompt": traj.prompts[prompt_index],
            "prompt_index": prompt_index,
        }

    def batches(self, batch_size: int, seed: int = 0, shuffle: bool = True, drop_remainder: bool = True,
                epochs: int | None = 1):
        """Batches of examples as dicts of stacked numpy arrays (prompts as a list), in a random order per
        epoch from `seed` (epochs=None: forever)."""
        rng = np.random.default_rng(seed)
        epoch = 0
        while epochs is None or epoch < epochs:
            order = rng.permutation(len(self)) if shuffle else np.arange(len(self))
            stop = len(order) - (len(order) % batch_size if drop_remainder else 0)
            for s in range(0, stop, batch_size):
                items = [self[int(k)] for k in order[s:s + batch_size]]
                yield {key: ([it[key] for it in items] if key == "prompt" else np.stack([it[key] for it in items]))
                       for key in items[0]}
            epoch += 1
