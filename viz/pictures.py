"""All pictures of one trajectory batch into a folder: grid, animation, convergence (+ JSON), attention."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from sdjax.io import write_json

from .animate import write_animation
from .attention import render_attention, select_words
from .completion import ddim_completions
from .convergence import convergence_numbers, render_convergence
from .grid import render_grid
from .run import choose_steps, decode


def decode_chunk(height: int, width: int) -> int:
    """Frames per decoder call: 32 for toy-sized images, a few for 512x512 (bounded activation memory)."""
    return int(np.clip(2**20 // (height * width), 1, 32))


def _note(msg: str) -> None:
    print(f"note: {msg}", file=sys.stderr)


def render(pipe, params, data, out_dir, *, columns: int = 8, completion_steps: int = 4,
           tokens: list[str] | None = None, title: str | None = None, note=_note) -> dict:
    """Write grid.png, completions.gif (+ .mp4), convergence.png, convergence.json and, when the data
    holds attention maps, attention.png. Returns {name: path}."""
    out_dir = Path(out_dir)
    words = select_words(pipe.tokenizer, data.prompts, tokens) if data.attention_maps is not None else None
    out_dir.mkdir(parents=True, exist_ok=True)
    steps, frames, completions, completion_images, completion_steps = _grid_inputs(pipe, params, data, columns,
                                                                                   completion_steps, note)
    files = {}
    desc = describe(data)
    files["grid"] = out_dir / "grid.png"
    render_grid(files["grid"], data, frames, steps, completion_images, completion_steps,
                title=title or rf"One-step completions $\hat{{x}}_0$ of each step  ({desc})")
    for i, path in enumerate(write_animation(out_dir / "completions.gif", data, frames)):
        files["animation" if i == 0 else "video"] = Path(path)
    numbers = convergence_numbers(data, frames, steps, completions, completion_images, completion_steps)
    files["convergence_json"] = out_dir / "convergence.json"
    write_json(files["convergence_json"], numbers)
    files["convergence"] = out_dir / "convergence.png"
    render_convergence(files["convergence"], numbers)
    if words is not None:
        files["attention"] = out_dir / "attention.png"
        render_attention(files["attention"], data, frames, steps, words,
                         title=f"Cross-attention to each word over the one-step completions  ({desc})")
    return files


def render_grid_only(pipe, params, data, path, *, columns: int = 8, completion_steps: int = 4,
                     title: str | None = None, note=_note) -> Path:
    """Only the completion grid of `data` (render's grid.png) at `path`: a panel that costs no animation,
    convergence or attention picture (`sdjax demo`'s ControlNet panel)."""
    steps, frames, _, completion_images, completion_steps = _grid_inputs(pipe, params, data, columns,
                                                                         completion_steps, note)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    render_grid(path, data, frames, steps, completion_images, completion_steps,
                title=title or rf"One-step completions $\hat{{x}}_0$ of each step  ({describe(data)})")
    return path


def _grid_inputs(pipe, params, data, columns: int, completion_steps: int, note):
    """(steps shown, decoded frames, K-step completions (latents, decoded images; None without), K)."""
    steps, clamp = choose_steps(data.num_steps, columns)
    if clamp:
        note(clamp)
    h, w = int(data.settings.get("height", 0) or 0), int(data.settings.get("width", 0) or 0)
    chunk = decode_chunk(h or pipe.default_size, w or pipe.default_size)
    frames = decode(pipe, params["vae"], data, chunk_size=chunk)
    completions = completion_images = None
    extras = getattr(data, "unet_extras", None) or {}
    extra = extras["extra_channels"].shape[1] if "extra_channels" in extras else 0
    if completion_steps and pipe.unet.in_channels != pipe.vae.latent_channels + extra:
        # an upscaler's run carries its extra channels (the noised low-resolution image) for the completions
        note(f"no {completion_steps}-step DDIM completions: this UNet also takes a mask and image latents "
             f"({pipe.unet.in_channels} input channels), which a completion from x_t alone does not have")
        completion_steps = 0
    if completion_steps:
        completions = ddim_completions(pipe, params, data, steps, completion_steps)
        completion_images = pipe.decode_frames(params["vae"], completions, chunk_size=chunk, progress=False)
    return steps, frames, completions, completion_images, completion_steps


def describe(data) -> str:
    """The run in a few words, for titles: sampler, steps, guidance, the edit or ControlNet."""
    desc = f"{data.settings.get('scheduler')}, {data.settings.get('steps', data.num_steps)} steps"
    if data.settings.get("edit"):  # image-to-image / inpainting: the calls from the start step on
        desc += f", the last {data.num_steps} model calls run"
    elif data.settings.get("steps", data.num_steps) != data.num_steps:  # PLMS, Heun: more calls than steps
        desc += f" = {data.num_steps} model calls"
    desc += f", guidance {data.settings.get('guidance_scale')}"
    if data.settings.get("edit"):
        desc += f", {data.settings['edit']} strength {data.settings.get('strength')}"
    if getattr(data, "control", None):
        desc += f", ControlNet{'s' if len(data.control['scales']) > 1 else ''}"
    return desc
