"""The completion grid (PNG): for each sample, x_t above its one-step completion x̂0 at chosen steps.

    columns: the chosen steps (title: step, timestep, noise level), then the final image
    rows, per sample (prompt and seed on the left): noisy x_t, x̂0, and optionally the K-step DDIM completion
    a ControlNet run: one more column after the prompt per ControlNet, its control image (and scale)
"""

from __future__ import annotations

import numpy as np

from .figure import PixelFigure, cell_size, step_title, upscale, wrap

MARGIN = 14
TITLE_H = 34
HEADER_H = 60
PROMPT_W = 170
ROWLABEL_W = 92
GAP = 6
GROUP_GAP = 22
FINAL_GAP = 26
CONTROL_GAP = 16  # after each control image column


def row_labels(completion_steps: int) -> list[str]:
    labels = ["noisy $x_t$", r"$\hat{x}_0$" + "\none step"]
    if completion_steps:
        labels.append(f"DDIM\n{completion_steps} step{'s' if completion_steps > 1 else ''}")
    return labels


def grid_size(n_samples: int, n_columns: int, n_rows: int, cell: int, n_control: int = 0) -> tuple[int, int]:
    """(width, height) in pixels of a grid (n_control: control image columns); the tests check the PNG against it."""
    width = (MARGIN + PROMPT_W + n_control * (cell + CONTROL_GAP) + ROWLABEL_W + n_columns * (cell + GAP) - GAP
             + FINAL_GAP + cell + MARGIN)
    group_h = n_rows * (cell + GAP) - GAP
    height = MARGIN + TITLE_H + HEADER_H + n_samples * group_h + (n_samples - 1) * GROUP_GAP + MARGIN
    return width, height


def render_grid(path, data, frames, steps: list[int], completions: np.ndarray | None = None,
                completion_steps: int = 0, title: str | None = None) -> tuple[int, int]:
    """Write the grid PNG. completions: decoded K-step DDIM images [S, B, H, W, 3] uint8 for `steps`."""
    if completions is None:
        completion_steps = 0
    labels = row_labels(completion_steps)
    n_rows, b, n_cols = len(labels), data.batch, len(steps)
    cell = cell_size(frames.final.shape[1])
    control = control_images(data)
    width, height = grid_size(b, n_cols, n_rows, cell, len(control))
    fig = PixelFigure(width, height)
    fig.text(MARGIN, MARGIN, title or "One-step completions of a diffusion trajectory", size=14, weight="bold")

    control_x = [MARGIN + PROMPT_W + k * (cell + CONTROL_GAP) for k in range(len(control))]
    x0_cols = MARGIN + PROMPT_W + len(control) * (cell + CONTROL_GAP) + ROWLABEL_W
    col_x = [x0_cols + j * (cell + GAP) for j in range(n_cols)]
    final_x = col_x[-1] + cell + FINAL_GAP
    head_y = MARGIN + TITLE_H
    for j, i in enumerate(steps):
        fig.text(col_x[j] + cell / 2, head_y + HEADER_H - 6, step_title(data, i), size=10, ha="center", va="bottom",
                 linespacing=1.35)
    fig.text(final_x + cell / 2, head_y + HEADER_H - 6, f"final\nafter {data.num_steps} steps", size=10,
             ha="center", va="bottom", weight="bold", linespacing=1.35)
    for k, x in enumerate(control_x):
        name = "control image" if len(control) == 1 else f"control image {k + 1}"
        fig.text(x + cell / 2, head_y + HEADER_H - 6, f"{name}\nscale {data.control['scales'][k]:g}", size=10,
                 ha="center", va="bottom", weight="bold", linespacing=1.35)

    group_h = n_rows * (cell + GAP) - GAP
    for s in range(b):
        gy = head_y + HEADER_H + s * (group_h + GROUP_GAP)
        prompt = wrap(data.prompts[s], PROMPT_W - 12, 11, max_lines=max(2, group_h // 18 - 1))
        fig.text(MARGIN, gy + group_h / 2, f"{prompt}", size=11, va="center", style="italic")
        fig.text(MARGIN, gy + group_h - 2, f"seed {data.seeds[s]}", size=9, va="bottom", color="0.45")
        rows = [frames.noisy[:, s], frames.x0[:, s]]
        if completion_steps:
            rows.append(completions[:, s])
        for r, label in enumerate(labels):
            ry = gy + r * (cell + GAP)
            fig.text(x0_cols - 8, ry + cell / 2, label, size=10, ha="right", va="center", multialignment="right")
            for j, i in enumerate(steps):
                img = rows[r][j] if r == 2 else rows[r][i]
                fig.image(col_x[j], ry, upscale(img, cell))
        fig.image(final_x, gy + (group_h - cell) / 2, upscale(frames.final[s], cell), border=40)
        for x, images in zip(control_x, control):
            fig.image(x, gy + (group_h - cell) / 2, upscale(images[s], cell), border=40)
    fig.save(path)
    return width, height


def control_images(data) -> list[np.ndarray]:
    """A ControlNet run's control images as uint8 [B, H, W, 3], one array per ControlNet (none without)."""
    control = getattr(data, "control", None)
    if not control:
        return []
    return [np.round(np.asarray(im).transpose(0, 2, 3, 1) * 255).astype(np.uint8) for im in control["images"]]
