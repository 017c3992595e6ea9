"""The animation: x_t | x̂0 side by side for every step, one row per sample (GIF; MP4 with imageio-ffmpeg).

Frames are composed with Pillow (fast, exact pixel sizes); the text uses matplotlib's DejaVu Sans.
"""

from __future__ import annotations

import importlib.util

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from sdjax.io import atomic_write

from .figure import cell_size, upscale

MARGIN = 10
HEADER_H = 30
COLHEAD_H = 22
LABEL_H = 18
GAP = 6
ROW_GAP = 8
STEP_MS = 180
FINAL_MS = 1800


def _font(size: int):
    from matplotlib import font_manager

    try:
        return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)
    except OSError:
        return ImageFont.load_default()


def frame_size(n_samples: int, cell: int) -> tuple[int, int]:
    width = MARGIN + 2 * cell + GAP + MARGIN
    height = MARGIN + HEADER_H + COLHEAD_H + n_samples * (LABEL_H + cell) + (n_samples - 1) * ROW_GAP + MARGIN
    return width, height


def _fit(draw, text: str, font, width: float) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def compose_frames(data, frames) -> list[np.ndarray]:
    """T + 1 RGB frames: one per step, then the final image (x_t = x̂0 = final)."""
    b = data.batch
    cell = cell_size(frames.final.shape[1])
    width, height = frame_size(b, cell)
    big, small = _font(14), _font(12)
    level = "σ" if data.sigma_space else "√(1-ᾱ)"
    out = []
    for i in range(data.num_steps + 1):
        im = Image.new("RGB", (width, height), "white")
        draw = ImageDraw.Draw(im)
        if i < data.num_steps:
            t = float(data.timesteps[i])
            head = f"step {i + 1}/{data.num_steps}   t = {t:.0f}   {level} = {float(data.noise_levels[i]):.3g}"
        else:
            head = f"final image after {data.num_steps} steps"
        draw.text((MARGIN, MARGIN), _fit(draw, head, big, width - 2 * MARGIN), fill="black", font=big)
        done = (i + 1) / data.num_steps if i < data.num_steps else 1.0  # progress bar under the header
        draw.rectangle((MARGIN, MARGIN + HEADER_H - 8, width - MARGIN, MARGIN + HEADER_H - 5), fill=(225, 225, 225))
        draw.rectangle((MARGIN, MARGIN + HEADER_H - 8, MARGIN + done * (width - 2 * MARGIN), MARGIN + HEADER_H - 5),
                       fill=(60, 110, 200))
        y = MARGIN + HEADER_H
        names = ("noisy x_t", "one-step x̂0") if i < data.num_steps else ("final", "final")
        for k, name in enumerate(names):
            x = MARGIN + k * (cell + GAP)
            draw.text((x + cell / 2, y), name, fill="black", font=small, anchor="ma")
        y += COLHEAD_H
        for s in range(b):
            draw.text((MARGIN, y), _fit(draw, data.prompts[s], small, width - 2 * MARGIN), fill=(90, 90, 90), font=small)
            y += LABEL_H
            pair = (frames.noisy[i, s], frames.x0[i, s]) if i < data.num_steps else (frames.final[s],) * 2
            for k, img in enumerate(pair):
                im.paste(Image.fromarray(upscale(img, cell)), (MARGIN + k * (cell + GAP), y))
            y += cell + ROW_GAP
        out.append(np.asarray(im))
    return out


def write_animation(path_gif, data, frames, mp4: bool = True) -> list:
    """Write the GIF (and an MP4 beside it when imageio-ffmpeg is installed); returns the paths written."""
    images = compose_frames(data, frames)
    durations = [STEP_MS] * (len(images) - 1) + [FINAL_MS]
    pil = [Image.fromarray(f) for f in images]
    atomic_write(path_gif, lambda f: pil[0].save(f, format="GIF", save_all=True, append_images=pil[1:],
                                                 duration=durations, loop=0, optimize=False, disposal=1))
    written = [path_gif]
    if mp4 and importlib.util.find_spec("imageio_ffmpeg") is not None:
        import imageio.v2 as imageio

        path_mp4 = str(path_gif)[: -len(".gif")] + ".mp4" if str(path_gif).endswith(".gif") else f"{path_gif}.mp4"
        h, w = images[0].shape[:2]
        ph, pw = -h % 16, -w % 16  # codec macroblocks
        fps = 1000 / STEP_MS
        with imageio.get_writer(path_mp4, fps=fps, codec="libx264", quality=8, macro_block_size=1) as writer:
            for f, ms in zip(images, durations):
                f = np.pad(f, ((0, ph), (0, pw), (0, 0)), constant_values=255)
                for _ in range(max(1, round(ms / STEP_MS))):
                    writer.append_data(f)
        written.append(path_mp4)
    return written
