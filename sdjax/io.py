"""Files: JSON, atomic writes, safetensors (streamed by tensor), PNG. Every writer in sdjax goes through here.

    write_json(path, obj)          # valid JSON only (a NaN is refused), written to a temp file then renamed
    atomic_write(path, lambda f: f.write(data))
    SafetensorsFiles([paths])      # a read-only mapping: a tensor is read when it is looked up
    write_png(path, image)         # float [H, W, 3] in [0, 1] or uint8

Readers never see half a file: a writer writes `.<name>.<random>.tmp` in the target's folder and renames it.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import threading
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .errors import ConfigError, SdjaxError, WeightsError

# Threads that read and convert tensors while loading (layout changes are strided copies; 2 threads halve
# SD 1.5's UNet load on a 2-core CPU, see BENCHMARKS.md).
LOAD_THREADS = min(8, os.cpu_count() or 1)
TMP_SUFFIX = ".tmp"


# ---------------------------------------------------------------------------------------------- JSON
def read_json(path, what: str = "file", error: type[SdjaxError] = ConfigError) -> dict:
    """A JSON object from `path`; a missing file, bad JSON or a non-object raises `error` naming the file."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise error(f"{what} not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path} is not valid JSON: {e}") from None
    except IsADirectoryError:
        raise error(f"{path} is a folder, expected a JSON {what}") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _finite(obj, where=""):
    """Check that a JSON-bound object holds no NaN/inf (which json writes as bare NaN: not JSON)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        raise ValueError(f"refusing to write the non-finite number {obj} at {where or 'the top'} as JSON")
    if isinstance(obj, dict):
        for k, v in obj.items():
            _finite(v, f"{where}.{k}" if where else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _finite(v, f"{where}[{i}]")


def dumps_json(obj) -> str:
    _finite(obj)
    return json.dumps(obj, indent=2, allow_nan=False, default=_json_default) + "\n"


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"{type(o).__name__} is not JSON serializable")


def write_json(path, obj) -> None:
    """Write `obj` as JSON atomically. NaN and inf are refused (they are not JSON)."""
    text = dumps_json(obj).encode()
    atomic_write(path, lambda f: f.write(text))


# ---------------------------------------------------------------------------------------------- atomic writes
def atomic_write(path, write) -> None:
    """Call `write(f)` on a new file beside `path`, then rename it to `path`: readers never see half a file.

    The file is created with mode 0o666 minus the process umask (a normal file's mode), by the OS itself:
    nothing here reads or changes the umask."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}{TMP_SUFFIX}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def remove_stale_temp_files(folder) -> int:
    """Delete the temp files an interrupted writer left in `folder` (never read by anyone)."""
    n = 0
    for p in Path(folder).glob(f".*{TMP_SUFFIX}"):
        if p.is_file():
            p.unlink()
            n += 1
    return n


# ---------------------------------------------------------------------------------------------- images
def to_uint8(image) -> np.ndarray:
    """float [.., 3] in [0, 1] (clipped) or uint8 -> uint8."""
    image = np.asarray(image)
    if image.dtype == np.uint8:
        return image
    return np.round(np.clip(image.astype(np.float32), 0.0, 1.0) * 255).astype(np.uint8)


def write_png(path, image) -> None:
    """The one PNG writer: float [H, W, 3|1] in [0, 1] or uint8, written atomically."""
    from PIL import Image

    img = to_uint8(image)
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    atomic_write(path, lambda f: Image.fromarray(img).save(f, format="PNG"))


# ---------------------------------------------------------------------------------------------- safetensors
def write_safetensors(path, tensors: dict[str, np.ndarray], metadata: dict | None = None) -> None:
    from safetensors.numpy import save

    meta = {"format": "pt", **(metadata or {})}
    if any(np.asarray(t).dtype.name == "bfloat16" for t in tensors.values()):
        # safetensors' numpy writer does not know ml_dtypes' bfloat16; its flax writer does.
        import jax.numpy as jnp
        from safetensors.flax import save as save_flax

        data = save_flax({k: jnp.asarray(v) for k, v in tensors.items()}, metadata=meta)
    else:
        data = save(tensors, metadata=meta)
    atomic_write(path, lambda f: f.write(data))


def _unreadable(path, e) -> WeightsError:
    return WeightsError(f"cannot read safetensors file {path}: {type(e).__name__}: {e} "
                        "(truncated or corrupt download? delete it and fetch it again)")


class SafetensorsFiles(Mapping):
    """The tensors of one or more safetensors files as a read-only mapping; a tensor is read (as a numpy
    array, from the memory-mapped file) only when it is looked up. A tensor name in two files is an error.

    `release()` unmaps the files (they are mapped again on the next lookup): a loader that calls it between
    batches of tensors never has more than one batch of the files' pages resident beside the arrays it made."""

    def __init__(self, files):
        self._paths, self._where, self._handles = [Path(f) for f in files], {}, {}
        self._lock = threading.Lock()
        for i, path in enumerate(self._paths):
            for k in self._handle(i).keys():
                if k in self._where:
                    first = self._paths[self._where[k]]
                    raise WeightsError(f"tensor {k!r} is in two weight files, {first} and {path}: "
                                       "which one is meant is unknown (a broken sharded checkpoint?)")
                self._where[k] = i
        self.release()

    def _handle(self, i: int):
        from safetensors import safe_open

        with self._lock:
            if i not in self._handles:
                try:
                    self._handles[i] = safe_open(str(self._paths[i]), framework="numpy")
                except Exception as e:
                    raise _unreadable(self._paths[i], e) from None
            return self._handles[i]

    def release(self) -> None:
        with self._lock:
            self._handles.clear()

    def file_of(self, key) -> Path:
        return self._paths[self._where[key]]

    def __getitem__(self, key):
        i = self._where[key]
        try:
            return self._handle(i).get_tensor(key)
        except WeightsError:
            raise
        except Exception as e:
            raise _unreadable(self._paths[i], e) from None

    def __iter__(self):
        return iter(self._where)

    def __len__(self):
        return len(self._where)


def listing(folder) -> str:
    """A folder's entries, for error messages."""
    try:
        names = sorted(p.name for p in Path(folder).iterdir())
    except OSError:
        return "nothing readable"
    return ", ".join(names) if names else "nothing"


# ---------------------------------------------------------------------------------------------- output folders
OUTPUT_MARKER = ".sdjax-output.json"


def _same_or_inside(a: Path, b: Path) -> bool:
    """a is b or a folder inside b."""
    a, b = a.resolve(), b.resolve()
    return a == b or b in a.parents


def check_output_dir(path, command: str, overwrite: bool = False, protect=(), own_files=()) -> dict | None:
    """Check, before any work starts, that `command` may write into the folder `path`.

    Refused (SdjaxError naming the folder): a file; a folder sdjax cannot create or write; a non-empty folder
    that is not this command's own output (its OUTPUT_MARKER, or one of `own_files` for outputs older than
    the marker) unless `overwrite`; any folder in `protect` (e.g. a training workdir), or a folder holding
    one, even with `overwrite` (a folder inside one is fine). Returns the previous run's marker or None.
    """
    path = Path(path)
    for p in protect:
        if p is not None and Path(p).exists() and _same_or_inside(Path(p), path):
            raise SdjaxError(f"refusing to write into {path}: it is (or holds) {p}, which must not be "
                             "replaced; choose another output folder")
    if path.exists() and not path.is_dir():
        raise SdjaxError(f"output {path} is a file, not a folder")
    previous = None
    if path.is_dir():
        # a temp file (another process's write probe, a write in flight) is never content
        entries = [p.name for p in path.iterdir() if not p.name.endswith(TMP_SUFFIX)]
        if (path / OUTPUT_MARKER).is_file():
            try:
                previous = json.loads((path / OUTPUT_MARKER).read_text())
            except (OSError, json.JSONDecodeError):
                previous = {}
            if previous.get("command") != command and not overwrite:
                raise SdjaxError(f"{path} holds the output of `{previous.get('command')}`; "
                                 "use another folder, or --overwrite to replace it")
        elif entries and not overwrite and not any((path / f).exists() for f in own_files):
            shown = ", ".join(sorted(entries)[:5]) + (", ..." if len(entries) > 5 else "")
            raise SdjaxError(f"{path} is not empty ({shown}) and is not an sdjax output folder; "
                             "use a new or empty folder, or --overwrite to write into it anyway")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".{OUTPUT_MARKER}.{secrets.token_hex(4)}{TMP_SUFFIX}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise SdjaxError(f"cannot write into {path}: {e.strerror or e}") from None
    return previous


def record_output(path, command: str, files=(), previous: dict | None = None, **extra) -> None:
    """Mark `path` as this command's output listing `files`; files the previous run listed and this one did not
    write are deleted (a rerun with fewer images leaves no stale ones beside the new settings)."""
    path = Path(path)
    files = [str(f) for f in files]
    for stale in set((previous or {}).get("files", [])) - set(files):
        target = path / stale
        if target.is_file() and target.parent.resolve() == path.resolve():
            target.unlink()
    write_json(path / OUTPUT_MARKER, {"command": command, "files": files, **extra})


# ---------------------------------------------------------------- host memory (glibc malloc)
_M_MMAP_THRESHOLD = -3



def write_folder(out_dir, command: str, fill) -> Path:
    """Write a whole folder: `fill(tmp)` writes the files into a temp folder beside `out_dir`; it is marked as
    `command`'s output (every file listed), made readable by everyone (like any installed file), then swapped in
    for `out_dir`. An interrupted write leaves the old folder, never half of the new one. Check `out_dir` with
    `check_output_dir` first."""
    import shutil
    import tempfile

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=TMP_SUFFIX))
    old = tmp.with_suffix(".old")
    try:
        fill(tmp)
        record_output(tmp, command, sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file()))
        for p in [tmp, *tmp.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        if out_dir.exists():
            out_dir.rename(old)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out_dir.exists():
            old.rename(out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return out_dir


def _glibc():
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:
        return None


def release_free_host_memory() -> bool:
    """Give the heap's free pages back to the OS (glibc `malloc_trim(0)`; a no-op elsewhere). Called after
    weights are loaded: converting a checkpoint frees as much as it keeps, and glibc holds freed arenas."""
    libc = _glibc()
    return bool(libc and libc.malloc_trim(0))


def limit_host_heap(mmap_threshold: int = 1 << 20) -> bool:
    """Serve allocations of `mmap_threshold` bytes or more with their own mappings, returned to the OS when
    freed (glibc `mallopt(M_MMAP_THRESHOLD)`; it also stops glibc raising the threshold as large blocks are
    freed, which keeps freed weight-sized blocks in the heap). Process-wide: the `sdjax` command calls it at
    start; a program embedding sdjax decides for itself. Returns whether it applied."""
    libc = _glibc()
    return bool(libc and libc.mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)))
