"""Turn a local folder or a Hugging Face Hub repo id into a local folder.

A name is a local path first: anything that cannot be a repo id (`./x`, `/x`, `a/b/c`, `~/x`, a name
whose first part is a local folder) that does not exist is reported as a missing local folder, with no
network access. Only `owner/name` goes to the hub, and then with bounded timeouts: a metadata request
(`SDJAX_HUB_TIMEOUT` seconds, default 10) tells within seconds whether the hub answers, before
`huggingface_hub.snapshot_download` fetches the files (allow-patterns that never fetch pickles).
`HF_HUB_OFFLINE=1` is honoured: the local cache is used, nothing is requested.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import SdjaxError
from .io import listing

# Everything a diffusers/transformers folder needs except pickled weights.
SAFE_PATTERNS = ("*.json", "*.safetensors", "*.txt", "*.msgpack", "*.model")
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


def hub_timeout() -> float:
    return float(os.environ.get("SDJAX_HUB_TIMEOUT", "10"))


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() not in ("0", "", "false", "no")


def looks_like_repo_id(name: str) -> bool:
    """`owner/name` that is not a local path (and whose `owner` is not a local folder either)."""
    name = os.fspath(name)
    if not _REPO_ID.fullmatch(name) or ".." in name or "--" in name or os.path.exists(name):
        return False
    return not os.path.isdir(name.split("/")[0])


def resolve_folder(path_or_repo_id: str | os.PathLike, subfolder: str | None = None,
                   allow_patterns=SAFE_PATTERNS, revision: str | None = None) -> Path:
    """Return the local folder (with `subfolder` appended) for a path or a hub repo id."""
    name = os.fspath(path_or_repo_id)
    if os.path.isdir(name):
        root = Path(name)
    elif os.path.exists(name):
        raise SdjaxError(f"model path {name!r} is a file, not a folder (expected a diffusers/transformers folder)")
    elif looks_like_repo_id(name):
        root = _download(name, subfolder, allow_patterns, revision)
    else:
        raise SdjaxError(f"model folder not found: {name!r} is not a local folder"
                         + ("" if "/" not in name else " (and not a hub repo id of the form 'owner/name')"))
    folder = root / subfolder if subfolder else root
    if not folder.is_dir():
        raise SdjaxError(f"subfolder {subfolder!r} not found in {root} (has: {listing(root)})")
    return folder


def _download(repo_id: str, subfolder: str | None, allow_patterns, revision) -> Path:
    from huggingface_hub import HfApi, snapshot_download

    patterns = [f"{subfolder}/{p}" if subfolder else p for p in allow_patterns]
    if subfolder:
        patterns.append("model_index.json")
    prefix = f"{repo_id!r} is not a local folder, and as a Hugging Face Hub repo id it"
    if not offline():
        try:  # a bounded request first: an unresponsive endpoint fails here, in seconds
            HfApi().repo_info(repo_id, revision=revision, timeout=hub_timeout())
        except Exception as e:  # unreachable, unknown repo, gated repo without token, ...
            raise SdjaxError(f"{prefix} could not be reached: {type(e).__name__}: {_first_line(e)}. Pass a local "
                             "folder, or check the name, your network and your token (`hf auth login`); "
                             "SDJAX_HUB_TIMEOUT sets the wait") from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, revision=revision,
                                      etag_timeout=hub_timeout()))
    except Exception as e:
        hint = " (HF_HUB_OFFLINE is set and it is not in the local cache)" if offline() else ""
        raise SdjaxError(f"{prefix} could not be downloaded{hint}: {type(e).__name__}: {_first_line(e)}") from None


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else ""
