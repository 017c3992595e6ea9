"""Textual inversion: new tokens for the tokenizer, new rows for the text encoder's embedding matrix.

    ti = load_textual_inversion("path/to/learned_embeds.safetensors", tokenizer, params["text_encoder"])
    params = {**params, "text_encoder": ti.params}
    text_encoder = text_encoder.clone(vocab_size=ti.vocab_size)       # the module's embedding table grew
    prompt = maybe_convert_prompt("a photo of <cat-toy>", tokenizer)  # multi-vector tokens expanded

Files (safetensors; pickles only with allow_pickle=True):
  * diffusers: {"<token>": [D] or [n, D]} (`learned_embeds.safetensors` in a folder);
  * A1111: {"emb_params": [n, D]} (token: `token=`, else the file name, as A1111 names it), or a pickled .pt with
    `string_to_param: {"*": [n, D]}` and `name`;
  * SDXL: {"clip_l": [n, 768], "clip_g": [n, 1280]}: `embedding_key=` picks one, else the one whose width is the
    text encoder's. Load it once per text encoder, each with its own tokenizer.
A multi-vector embedding adds the tokens `<tok>`, `<tok>_1`, ..., `<tok>_{n-1}`, and `maybe_convert_prompt` writes
`<tok>` in a prompt as all of them, as diffusers does.

The tokenizer (a transformers tokenizer) gains the tokens in place, as in diffusers; the params are returned new.
Nothing changes when an error is raised (a token that already exists, or an embedding of the wrong width).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from .errors import AdapterError
from .hub import looks_like_repo_id, resolve_folder
from .io import listing
from .lora import read_weights_file
from .models.modeling_utils import PICKLE_SUFFIXES

TEXT_INVERSION_NAME_SAFE = "learned_embeds.safetensors"
TEXT_INVERSION_NAME = "learned_embeds.bin"
EMBEDDING_PATH = ("embeddings", "token_embedding", "embedding")  # CLIPTextModel's [vocab, D] table
# CLIPTextModelWithProjection (SDXL's text_encoder_2) has the same table under its `text_model`.
PROJECTION_EMBEDDING_PATH = ("text_model",) + EMBEDDING_PATH
SDXL_KEYS = ("clip_l", "clip_g")


class TextualInversion(NamedTuple):
    params: dict          # the text encoder's params with the new rows
    vocab_size: int       # rows of the new embedding table: the CLIPTextModel's new `vocab_size`
    tokens: list[str]     # the tokens added (`<tok>`, `<tok>_1`, ... for a multi-vector embedding)
    token_ids: list[int]  # their ids


def load_textual_inversion(path_or_file, tokenizer, text_encoder_params: Mapping[str, Any], token: str | None = None,
                           embedding_key: str | None = None, weight_name: str | None = None,
                           allow_pickle: bool = False) -> TextualInversion:
    """Add a textual-inversion embedding to `tokenizer` (in place) and to the text encoder params (returned).

    path_or_file: a file, a folder (`learned_embeds.safetensors` or `weight_name`), a hub repo id, or a state dict.
    token: the token to add (default: the file's own: its key, A1111's `name`, or the file name).
    embedding_key: for files with several embeddings (SDXL's clip_l / clip_g), which one.
    Raises AdapterError naming the file when the token (or `<tok>_1`...) is already in the tokenizer, the width
    does not match the text encoder's (both named), or the file is not a textual-inversion file.
    """
    state, source, stem = _read(path_or_file, weight_name, allow_pickle)
    table_path, table = embedding_table(text_encoder_params)
    width = int(table.shape[-1])
    token, embedding = _token_and_embedding(state, source, stem, token, embedding_key, width)
    if embedding.ndim == 1:
        embedding = embedding[None]
    if embedding.ndim != 2 or embedding.shape[0] < 1:
        raise AdapterError(f"textual inversion {source}: expected an embedding of shape [D] or [n, D], got "
                           f"{tuple(embedding.shape)}")
    if embedding.shape[1] != width:
        raise AdapterError(f"textual inversion {source}: the embedding {token!r} is {embedding.shape[1]} wide, the text "
                           f"encoder's token embeddings are {width} wide (a file for another text encoder?)")
    tokens = [token] + [f"{token}_{i}" for i in range(1, embedding.shape[0])]
    vocab = tokenizer.get_vocab()
    taken = [t for t in tokens + ([f"{token}_1"] if len(tokens) == 1 else []) if t in vocab]
    if taken:
        raise AdapterError(f"textual inversion {source}: token(s) {taken} already in the tokenizer; pass token= with "
                           "another name (or use a fresh tokenizer)")

    ids = []
    for t in tokens:
        if tokenizer.add_tokens(t) != 1:
            raise AdapterError(f"textual inversion {source}: the tokenizer did not add {t!r}")
        ids.append(int(tokenizer.convert_tokens_to_ids(t)))
    rows = max(int(table.shape[0]), max(ids) + 1)
    new_table = jnp.concatenate([jnp.asarray(table), jnp.zeros((rows - table.shape[0], width), table.dtype)])
    new_table = new_table.at[jnp.asarray(ids)].set(jnp.asarray(embedding, table.dtype))
    return TextualInversion(params=_replace(text_encoder_params, table_path, new_table), vocab_size=rows,
                            tokens=tokens, token_ids=ids)


def maybe_convert_prompt(prompt: str | list[str], tokenizer) -> str | list[str]:
    """diffusers' `maybe_convert_prompt`: each added token `<tok>` with `<tok>_1`, `<tok>_2`, ... in the tokenizer
    (a multi-vector embedding) is written as `<tok> <tok>_1 <tok>_2 ...`; other prompts are returned unchanged."""
    if isinstance(prompt, list):
        return [_convert_one(p, tokenizer) for p in prompt]
    return _convert_one(prompt, tokenizer)


def _convert_one(prompt: str, tokenizer) -> str:
    added = tokenizer.added_tokens_encoder
    for token in set(tokenizer.tokenize(prompt)):
        if token in added:
            replacement, i = token, 1
            while f"{token}_{i}" in added:
                replacement += f" {token}_{i}"
                i += 1
            prompt = prompt.replace(token, replacement)
    return prompt


# ---------------------------------------------------------------------------------------------- helpers
def _read(path_or_file, weight_name, allow_pickle):
    """-> (state dict, source for messages, file stem or None)."""
    if isinstance(path_or_file, Mapping):
        return path_or_file, "state dict", None
    name = os.fspath(path_or_file)
    path = Path(name)
    if not path.exists():
        if not looks_like_repo_id(name):
            raise AdapterError(f"textual inversion file not found: {name!r}")
        path = resolve_folder(name, allow_patterns=(weight_name or "*.safetensors",))
    if path.is_dir():
        folder = path
        candidates = [weight_name] if weight_name else [TEXT_INVERSION_NAME_SAFE, TEXT_INVERSION_NAME]
        path = next((folder / c for c in candidates if (folder / c).is_file()), None)
        if path is None:
            raise AdapterError(f"no textual inversion in {folder}: expected {' or '.join(candidates)} "
                               f"(has: {listing(folder)})")
    if path.suffix in PICKLE_SUFFIXES and allow_pickle:
        return _read_pickled_embedding(path), str(path), path.stem
    state, _ = read_weights_file(path, allow_pickle, what="textual inversion")
    return state, str(path), path.stem


def _read_pickled_embedding(path: Path) -> dict:
    """A pickled diffusers ({token: tensor}) or A1111 ({"string_to_param": {"*": tensor}, "name": ...}) file."""
    try:
        import torch
    except ImportError:
        raise AdapterError(f"reading the pickle {path} needs torch (pip install torch), or convert it to safetensors") \
            from None
    data = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(data, torch.Tensor):
        return {"": data.float().numpy()}

    def arrays(d):
        out = {}
        for k, v in d.items():
            if isinstance(v, torch.Tensor):
                out[k] = v.float().numpy()
            elif isinstance(v, dict):
                out[k] = arrays(v)
            elif isinstance(v, str):
                out[k] = v
        return out

    return arrays(data)


def _token_and_embedding(state, source, stem, token, embedding_key, width) -> tuple[str, np.ndarray]:
    keys = list(state.keys())
    if embedding_key is not None:
        if embedding_key not in state:
            raise AdapterError(f"textual inversion {source} has no {embedding_key!r} (has: {keys})")
        return _need_token(token, stem, source), np.asarray(state[embedding_key], np.float32)
    if any(k in state for k in SDXL_KEYS):
        fits = [k for k in SDXL_KEYS if k in state and np.shape(state[k])[-1] == width]
        if len(fits) != 1:
            widths = {k: np.shape(state[k])[-1] for k in SDXL_KEYS if k in state}
            raise AdapterError(f"textual inversion {source} holds SDXL embeddings {widths}; "
                               f"{'none' if not fits else 'more than one'} is {width} wide like this text encoder: "
                               "pass embedding_key='clip_l' or 'clip_g'")
        return _need_token(token, stem, source), np.asarray(state[fits[0]], np.float32)
    if "string_to_param" in state:  # A1111 .pt
        inner = state["string_to_param"]
        if not isinstance(inner, Mapping) or "*" not in inner:
            raise AdapterError(f"textual inversion {source}: 'string_to_param' has no '*' embedding")
        name = state.get("name") if isinstance(state.get("name"), str) else stem
        return token or name, np.asarray(inner["*"], np.float32)
    if "string_to_param.*" in state:  # A1111 flattened into safetensors
        return _need_token(token, stem, source), np.asarray(state["string_to_param.*"], np.float32)
    if "emb_params" in state:  # A1111 safetensors
        return _need_token(token, stem, source), np.asarray(state["emb_params"], np.float32)
    if len(keys) == 1:  # diffusers: {token: embedding}
        (key,) = keys
        return token or key or _need_token(None, stem, source), np.asarray(state[key], np.float32)
    raise AdapterError(f"textual inversion {source}: not a textual-inversion file: expected one {{token: embedding}} "
                       f"entry (diffusers), 'emb_params' or 'string_to_param' (A1111), or 'clip_l'/'clip_g' (SDXL); "
                       f"has {keys[:10]}")


def _need_token(token, stem, source) -> str:
    if token:
        return token
    if stem:
        return stem
    raise AdapterError(f"textual inversion {source} does not name its token: pass token=")


def embedding_table(params):
    """(path, [vocab, D] token-embedding table) of a CLIPTextModel or CLIPTextModelWithProjection params tree."""
    for path in (EMBEDDING_PATH, PROJECTION_EMBEDDING_PATH):
        node = params
        for k in path:
            if not isinstance(node, Mapping) or k not in node:
                break
            node = node[k]
        else:
            return path, node
    raise AdapterError("text_encoder_params has no embeddings/token_embedding/embedding table (expected a "
                       "CLIPTextModel or CLIPTextModelWithProjection params tree, e.g. params['text_encoder'])")


def with_embedding_table(params, table) -> dict:
    """A text encoder's params tree with its token-embedding table replaced by `table` (traceable)."""
    path, _ = embedding_table(params)
    return _replace(params, path, table)


def _replace(tree: Mapping, path: tuple[str, ...], value) -> dict:
    out = dict(tree)
    out[path[0]] = value if len(path) == 1 else _replace(tree[path[0]], path[1:], value)
    return out
