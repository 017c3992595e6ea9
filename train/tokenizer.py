"""A CLIP-format BPE tokenizer learnt from a caption corpus with the `tokenizers` library.

    build_clip_tokenizer(captions, "out/tokenizer", model_max_length=16)
    CLIPTokenizer.from_pretrained("out/tokenizer")   # transformers (and sdjax.tokenizer.load_tokenizer) load it

The folder has CLIP's hub layout: vocab.json + merges.txt (+ tokenizer_config.json). As in CLIP, the
vocabulary starts with the 256 byte characters and their `</w>` (end of word) forms, so any text
encodes; then one token per learnt merge; then <|startoftext|> and <|endoftext|> (also the padding).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from sdjax.tokenizer import bytes_to_unicode, load_tokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def build_clip_tokenizer(captions, folder, model_max_length: int = 16, vocab_size: int = 2048) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    chars = list(bytes_to_unicode().values())
    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # captions are lowercased words; CLIP splits the same way
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, show_progress=False,
                                  end_of_word_suffix="</w>", initial_alphabet=chars, special_tokens=[])
    tok.train_from_iterator([c.lower() for c in captions], trainer)
    merges = json.loads(tok.to_str())["model"]["merges"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]

    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = list(dict.fromkeys(vocab))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": model_max_length, "bos_token": BOS,
        "eos_token": EOS, "unk_token": EOS, "pad_token": EOS, "do_lower_case": True,
    }, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}, indent=2))
    return folder


def load(folder):
    return load_tokenizer(folder, subfolder=None)


def encode(tokenizer, captions) -> np.ndarray:
    """Captions -> int32 [N, model_max_length] ids, padded with <|endoftext|>, truncated."""
    ids = tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="np").input_ids
    return ids.astype(np.int32)
