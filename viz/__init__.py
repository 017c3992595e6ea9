"""Visualizing a diffusion trajectory by its one-step completions (x̂0), as the project's proposal asked.

    from sdjax.viz import render, run_live, from_shard
    data = run_live(pipe, params, prompts, seed=0, steps=25, guidance=5.0, attentions=True)
    # or: out = pipe(ids, params, key, ..., output_attentions=True); data = from_output(pipe, out, prompts,
    #         settings={"guidance_scale": 5.0})
    files = render(pipe, params, data, "out/")   # grid.png, completions.gif, convergence.png/.json, attention.png

Modules: run (trajectory data, decoding, step choice), completion (K-step DDIM second opinion),
grid, animate, convergence, attention (one picture each), figure (pixel layout), pictures (`render`: all
of them into a folder). The commands `sdjax viz` and `sdjax demo` are in sdjax.cli.viz.
"""

import importlib

COMPLETION_STEPS = (1, 2, 4)  # K of the K-step DDIM completions (viz.completion); here so the CLI needs no jax

# Lazy: `sdjax --help` imports this package; matplotlib and jax load only when a picture is made.
_EXPORTS = {"render": "pictures", "Frames": "run", "VizData": "run", "choose_steps": "run", "decode": "run",
            "from_output": "run", "from_shard": "run", "run_live": "run", "run_live_cascade": "run"}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sdjax.viz' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
