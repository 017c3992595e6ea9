"""Turn a local folder or a Hugging Face Hub repo id into a local folder.

Repo ids go through `huggingface_hub.snapshot_download` with allow-patterns that never fetch pickles.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import SdjaxError

# Everything a diffusers/transformers folder needs except pickled weights.
SAFE_PATTERNS = ("*.json", "*.safetensors", "*.txt", "*.msgpack", "*.model")


def looks_like_repo_id(name: str) -> bool:
    parts = name.split("/")
    return (
        len(parts) == 2
        and all(parts)
        and not name.startswith((".", "/", "~"))
        and not os.path.exists(name)
    )


def resolve_folder(path_or_repo_id: str | os.PathLike, subfolder: str | None = None,
                   allow_patterns=SAFE_PATTERNS, revision: str | None = None) -> Path:
    """Return the local folder (with `subfolder` appended) for a path or a hub repo id."""
    name = os.fspath(path_or_repo_id)
    if os.path.isdir(name):
        root = Path(name)
    elif looks_like_repo_id(name):
        root = _download(name, subfolder, allow_patterns, revision)
    else:
        raise SdjaxError(f"model folder not found: {name!r} (neither a local directory nor a hub repo id 'owner/name')")
    folder = root / subfolder if subfolder else root
    if not folder.is_dir():
        raise SdjaxError(f"subfolder {subfolder!r} not found in {root} (has: {sorted(p.name for p in root.iterdir())})")
    return folder


def _download(repo_id: str, subfolder: str | None, allow_patterns, revision) -> Path:
    from huggingface_hub import snapshot_download

    patterns = [f"{subfolder}/{p}" if subfolder else p for p in allow_patterns]
    if subfolder:
        patterns.append("model_index.json")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, revision=revision))
    except Exception as e:  # offline, unknown repo, gated repo without token, ...
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
        hint = " (HF_HUB_OFFLINE is set)" if offline else ""
        raise SdjaxError(
            f"could not download {repo_id!r} from the Hugging Face Hub{hint}: {type(e).__name__}: {e}. "
            "Pass a local folder instead, or check the repo id, your network and your token (`hf auth login`)."
        ) from None
