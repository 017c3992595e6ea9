"""Figures laid out in pixels: images pasted at exact positions, text where it fits, a known output size.

Matplotlib draws the text (mathtext for x̂0, sigma, alpha-bar); images are upscaled here, with nearest
neighbour for small ones, so a 32x32 sample stays crisp and matplotlib never resamples them.
"""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from sdjax.io import atomic_write

DPI = 100
CELL = 128  # target display size of one image, in pixels


def cell_size(image_size: int, target: int = CELL) -> int:
    """Integer nearest-neighbour upscale for small images (32 -> 128); large ones are shrunk to `target`."""
    if image_size <= target:
        return image_size * max(1, target // image_size)
    return target


def upscale(img: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, 3] -> [size, size * W / H, 3]: nearest for integer upscales, Lanczos otherwise."""
    h, w = img.shape[:2]
    if size % h == 0 and size >= h:
        f = size // h
        return np.repeat(np.repeat(img, f, axis=0), f, axis=1)
    return np.asarray(Image.fromarray(img).resize((round(w * size / h), size), Image.LANCZOS))


class PixelFigure:
    """A matplotlib figure of exactly width x height pixels, addressed from the top-left corner.

    Images are pasted into one RGB canvas, drawn once with `figimage` (no resampling, one artist);
    matplotlib draws only the text on top."""

    def __init__(self, width: int, height: int, facecolor: str = "white"):
        self.width, self.height = int(width), int(height)
        self.fig = Figure(figsize=(self.width / DPI, self.height / DPI), dpi=DPI, facecolor=facecolor)
        self.canvas = np.full((self.height, self.width, 3), 255, np.uint8)

    def image(self, x: float, y: float, img: np.ndarray, border: int | None = None) -> None:
        """Paste uint8 [h, w, 3] with its top-left corner at (x, y); border: a gray frame of 2 px around it."""
        x, y = int(round(x)), int(round(y))
        h, w = img.shape[:2]
        if border is not None:
            self.canvas[max(y - 2, 0):y + h + 2, max(x - 2, 0):x + w + 2] = border
        self.canvas[y:y + h, x:x + w] = img

    def text(self, x: float, y: float, s: str, size: float = 11, ha: str = "left", va: str = "top", **kw):
        return self.fig.text(x / self.width, 1 - y / self.height, s, fontsize=size, ha=ha, va=va, **kw)

    def save(self, path) -> None:
        self.fig.figimage(self.canvas, xo=0, yo=0, origin="upper", zorder=0)
        save_figure(self.fig, path, facecolor=self.fig.get_facecolor())


def save_figure(fig, path, **kwargs) -> None:
    """Write a matplotlib figure as PNG atomically (a reader never sees half a picture).

    Figures here are `matplotlib.figure.Figure`s, never pyplot's: files only, no window, and the backend of the
    process (a notebook's inline one) is left alone."""
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=DPI, **kwargs))


def plain(text: str) -> str:
    """User text (prompts) shown literally: a '$' must not start matplotlib's mathtext."""
    return text.replace("$", r"\$")


def wrap(text: str, width_px: float, size: float, max_lines: int) -> str:
    """Greedy word wrap for a box `width_px` wide (DejaVu Sans averages ~0.55 em per character)."""
    per_line = max(4, int(width_px / (0.58 * size * DPI / 72)))
    lines, cur = [], ""
    for word in text.split():
        if cur and len(cur) + 1 + len(word) > per_line:
            lines.append(cur)
            cur = word
        else:
            cur = f"{cur} {word}" if cur else word
    if cur:
        lines.append(cur)
    lines = [ln if len(ln) <= per_line else ln[: per_line - 1] + "…" for ln in lines]
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][: per_line - 1].rstrip() + "…"
    return plain("\n".join(lines))


def step_title(data, i: int) -> str:
    """Column title: step number, timestep and noise level, as three lines."""
    t = float(data.timesteps[i])
    t_str = f"{t:.0f}" if abs(t - round(t)) < 1e-3 else f"{t:.1f}"
    s = float(data.noise_levels[i])
    level = rf"$\sigma$ = {s:.3g}" if data.sigma_space else rf"$\sqrt{{1-\bar\alpha}}$ = {s:.3f}"
    return f"step {i + 1}/{data.num_steps}\nt = {t_str}\n{level}"
