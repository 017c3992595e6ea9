"""Cross-attention maps per word, over the one-step completions (DAAM-style).

The pipeline, called with output_attentions=True, returns for each step the UNet's cross-attention
probabilities of the conditional half, averaged over heads and layers, at latent resolution:
[T, B, h, w, L] (each pixel's distribution over the L prompt tokens). A word's map is the sum over its
BPE tokens; here it is upsampled (bilinear) and drawn as a heat map over that step's x̂0.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from sdjax.errors import SdjaxError

from .figure import PixelFigure, cell_size, plain, step_title, upscale, wrap
from .grid import GAP, GROUP_GAP, HEADER_H, MARGIN, PROMPT_W

TITLE_H = 52  # title and a line saying what the heat means

STOPWORDS = frozenset("a an the on of in at to and with by for from is".split())
MAX_DEFAULT_WORDS = 4
WORD_W = 92
HEAT_ALPHA = 0.75


def prompt_words(tokenizer, prompt: str) -> list[tuple[str, list[int]]]:
    """The prompt's words and their token positions (BPE pieces of a word end with '</w>')."""
    ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids
    toks = tokenizer.convert_ids_to_tokens(ids)
    special = set(tokenizer.all_special_tokens)
    words, cur = [], []
    for pos, tok in enumerate(toks):
        if tok in special:
            continue
        cur.append((pos, tok))
        if tok.endswith("</w>"):
            words.append(cur)
            cur = []
    if cur:
        words.append(cur)
    return [(tokenizer.decode([ids[p] for p, _ in w]).strip(), [p for p, _ in w]) for w in words]


def _merged(words: list[tuple[str, list[int]]]) -> dict[str, list[int]]:
    """word (lowercase) -> all its token positions in the prompt, in order of first appearance."""
    out: dict[str, list[int]] = {}
    for w, pos in words:
        out.setdefault(w.lower(), []).extend(pos)
    return out


def select_words(tokenizer, prompts: list[str], tokens: list[str] | None) -> list[list[tuple[str, list[int]]]]:
    """Per prompt, the (word, positions) to draw: the requested words, or its content words by default.
    A word that occurs twice in a prompt is one row (its maps are summed)."""
    per_prompt = [_merged(prompt_words(tokenizer, p)) for p in prompts]
    if not tokens:
        out = []
        for words in per_prompt:
            content = [(w, pos) for w, pos in words.items() if w not in STOPWORDS] or list(words.items())
            out.append(content[:MAX_DEFAULT_WORDS])
        return out
    wanted = list(dict.fromkeys(t.strip().lower() for t in tokens if t.strip()))
    for t in wanted:
        if not any(t in words for words in per_prompt):
            listing = "; ".join(f"{p!r}: {', '.join(words)}" for p, words in zip(prompts, per_prompt))
            raise SdjaxError(f"--tokens: {t!r} is not a word of the prompt (the prompt's tokens: {listing})")
    return [[(t, words[t]) for t in wanted if t in words] for words in per_prompt]


def word_maps(attention_maps: np.ndarray, sample: int, positions: list[int]) -> np.ndarray:
    """[T, h, w]: the attention of each pixel to the word (sum over its tokens)."""
    return attention_maps[:, sample][..., positions].sum(-1)


def upsample(maps: np.ndarray, size: int) -> np.ndarray:
    """[T, h, w] -> [T, size, size] (bilinear), scaled to [0, 1] over all steps of the word together,
    so one row of the figure compares steps on one scale (and a near-uniform map is not all red)."""
    up = np.stack([np.asarray(Image.fromarray(m.astype(np.float32), mode="F").resize((size, size), Image.BILINEAR))
                   for m in maps])
    lo, hi = float(up.min()), float(up.max())
    return (up - lo) / max(hi - lo, 1e-12)


def overlay(img: np.ndarray, heat: np.ndarray, size: int) -> np.ndarray:
    """x̂0 frame in gray (upscaled to `size`) under the heat map heat [size, size] in [0, 1].

    Gray, so that the heat's colors never mix with the image's own (a red circle under red heat)."""
    import matplotlib

    rgb = upscale(img, size).astype(np.float32) / 255.0
    gray = (rgb @ np.array([0.299, 0.587, 0.114], np.float32))[..., None] * 0.85 + 0.075
    color = matplotlib.colormaps["turbo"](heat)[..., :3]
    a = HEAT_ALPHA * heat[..., None]  # strong attention in color; where there is little, the x̂0 shows through
    return np.round(((1 - a) * gray + a * color) * 255).clip(0, 255).astype(np.uint8)


def attention_size(rows_per_sample: list[int], n_columns: int, cell: int) -> tuple[int, int]:
    width = MARGIN + PROMPT_W + WORD_W + n_columns * (cell + GAP) - GAP + MARGIN
    groups = [max(r, 1) * (cell + GAP) - GAP for r in rows_per_sample]
    height = MARGIN + TITLE_H + HEADER_H + sum(groups) + (len(groups) - 1) * GROUP_GAP + MARGIN
    return width, height


def render_attention(path, data, frames, steps: list[int], words: list[list[tuple[str, list[int]]]],
                     title: str | None = None) -> tuple[int, int]:
    if data.attention_maps is None:
        raise SdjaxError("no attention maps: they come from a live run with output_attentions=True")
    cell = cell_size(frames.final.shape[1])
    rows = [len(w) for w in words]
    width, height = attention_size(rows, len(steps), cell)
    fig = PixelFigure(width, height)
    fig.text(MARGIN, MARGIN, title or "Cross-attention to each word over the one-step completions", size=14,
             weight="bold")
    fig.text(MARGIN, MARGIN + 24, r"$\hat{x}_0$ in gray; heat (blue to red): attention to the word, mean over heads and layers, "
             "scaled to its row's range; "
             "'mean': the word's share of the attention, averaged over pixels and steps", size=9, color="0.35")
    x0_cols = MARGIN + PROMPT_W + WORD_W
    col_x = [x0_cols + j * (cell + GAP) for j in range(len(steps))]
    head_y = MARGIN + TITLE_H
    for j, i in enumerate(steps):
        fig.text(col_x[j] + cell / 2, head_y + HEADER_H - 6, step_title(data, i), size=10, ha="center", va="bottom",
                 linespacing=1.35)
    y = head_y + HEADER_H
    for s in range(data.batch):
        group_h = max(rows[s], 1) * (cell + GAP) - GAP
        fig.text(MARGIN, y + group_h / 2, wrap(data.prompts[s], PROMPT_W - 12, 11, max(2, group_h // 18 - 1)),
                 size=11, va="center", style="italic")
        if not words[s]:
            fig.text(x0_cols, y + group_h / 2, "(none of the requested words is in this prompt)", size=10,
                     va="center", color="0.4")
        for r, (word, positions) in enumerate(words[s]):
            ry = y + r * (cell + GAP)
            maps = word_maps(data.attention_maps, s, positions)
            mass = float(maps.mean())
            heat = upsample(maps[steps], cell)
            fig.text(x0_cols - 8, ry + cell / 2, f"“{plain(word)}”\nmean {mass:.2f}", size=10, ha="right", va="center",
                     multialignment="right")
            for j, i in enumerate(steps):
                fig.image(col_x[j], ry, overlay(frames.x0[i, s], heat[j], cell))
        y += group_h + GROUP_GAP
    fig.save(path)
    return width, height
