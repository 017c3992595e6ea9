"""The CLIP tokenizer of a Stable Diffusion folder (`tokenizer/`), as a transformers tokenizer.

    tokenizer = load_tokenizer("path/or/repo")            # reads <path>/tokenizer
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="np").input_ids       # [B, 77]

Two folder layouts load to the same tokenizer:
  * vocab.json + merges.txt (+ tokenizer_config.json, special_tokens_map.json): every SD repo on the hub;
  * tokenizer.json (+ tokenizer_config.json): what transformers 5 `save_pretrained` writes.

The tokenizer is transformers' `CLIPTokenizerFast` (the `tokenizers`-backed CLIP BPE). It is the only CLIP
tokenizer transformers 5 has (there `CLIPTokenizerFast` is an alias of `CLIPTokenizer`), it reads both
layouts, and on transformers 4 it is the class that reads a folder with only tokenizer.json (the slow
pure-Python `CLIPTokenizer` needs vocab.json + merges.txt). Its ids match the slow tokenizer's
(transformers' own CLIP tokenizer tests check that).
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import SdjaxError
from .hub import looks_like_repo_id, resolve_folder
from .io import listing

# What a tokenizer folder may hold; repo ids download only these (never weights).
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json")
EXPECTED = "vocab.json + merges.txt, or tokenizer.json"
CLIP_CONTEXT_LENGTH = 77


def find_tokenizer_folder(path_or_repo_id, subfolder: str | None = "tokenizer") -> Path:
    """The local folder holding the tokenizer files (downloading a repo id's tokenizer files only)."""
    name = os.fspath(path_or_repo_id)
    if os.path.isdir(name):
        root = Path(name)
        folder = root / subfolder if subfolder else root
        if not folder.is_dir():
            if _has_tokenizer_files(root):
                # A tokenizer folder given directly: use it.
                return root
            raise SdjaxError(f"tokenizer folder not found: {folder} (expected {EXPECTED} there; "
                             f"{root} has: {listing(root)})")
        return folder
    if os.path.exists(name):
        raise SdjaxError(f"tokenizer path {name!r} is a file, not a folder (expected a folder with {EXPECTED})")
    if not looks_like_repo_id(name):
        raise SdjaxError(f"tokenizer folder not found: {name!r} is neither a local folder nor a hub repo id "
                         f"'owner/name' (expected a folder with {EXPECTED})")
    return resolve_folder(name, subfolder, allow_patterns=TOKENIZER_FILES)


def load_tokenizer(path_or_repo_id, subfolder: str | None = "tokenizer"):
    """Load the CLIP tokenizer from `path_or_repo_id/subfolder` (a local folder or a hub repo id).

    Returns a transformers `CLIPTokenizerFast`. Raises SdjaxError naming the folder and the expected
    files when they are missing, and naming the repo id when it cannot be downloaded (e.g. offline).
    `model_max_length` is CLIP's context length (77) when the folder does not set it.
    """
    folder = find_tokenizer_folder(path_or_repo_id, subfolder)
    if not _has_tokenizer_files(folder):
        raise SdjaxError(f"no tokenizer files in {folder}: expected {EXPECTED} (has: {listing(folder)})")

    from transformers import CLIPTokenizerFast

    try:
        tokenizer = CLIPTokenizerFast.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # corrupt JSON, malformed merges, ...
        raise SdjaxError(f"cannot read the tokenizer in {folder}: {type(e).__name__}: {e}") from None
    if tokenizer.model_max_length > 10**6:  # transformers' "not set" sentinel (a huge int)
        tokenizer.model_max_length = CLIP_CONTEXT_LENGTH
    return tokenizer


def _has_tokenizer_files(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or (
        (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file())


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map of the 256 bytes to printable unicode characters (the first 512 tokens of a
    CLIP vocabulary are these characters and their `</w>` forms)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))
