"""The proposal's hypothesis, measured: how far is each step's completion from the final image?

For step i < T the completion is x̂0 (decoded for pixels); at i = T it is the final sample itself, so
every curve ends at 0. Pixel MSE is over decoded uint8 images scaled to [0, 1]; latent MSE over latents.
The noisy x_t (what the usual visualization shows) and the K-step DDIM completions are measured too.
"""

from __future__ import annotations

import numpy as np

from .figure import DPI, plain, save_figure

FIGSIZE = (13.0, 5.2)  # inches at 100 dpi -> 1300 x 520 px


def _mse(a, b, axes) -> np.ndarray:
    return np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2, axis=axes)


def convergence_numbers(data, frames, steps: list[int] | None = None, completions: np.ndarray | None = None,
                        completion_images: np.ndarray | None = None, completion_steps: int = 0) -> dict:
    """The JSON behind convergence.png. Lists are indexed by step 0..T (T = the final sample)."""
    final_px = frames.final.astype(np.float64) / 255.0       # [B, H, W, 3]
    final_lat = data.latents[-1]                            # [B, C, h, w]
    px = _mse(frames.x0 / 255.0, final_px[None], (2, 3, 4))  # [T, B]
    lat = _mse(data.x0, final_lat[None], (2, 3, 4))
    noisy_px = _mse(frames.noisy / 255.0, final_px[None], (2, 3, 4))
    noisy_lat = _mse(data.noisy_latents(), final_lat[None], (2, 3, 4))
    zero = np.zeros((1, data.batch))
    px, lat, noisy_px, noisy_lat = (np.concatenate([a, zero]) for a in (px, lat, noisy_px, noisy_lat))
    out = {
        "description": "MSE of each step's completion to the final sample; index i < T: step i's one-step "
                       "completion x0_hat (x_t: the noisy sample itself); index T: the final sample (0).",
        "scheduler": data.settings.get("scheduler"), "guidance_scale": data.settings.get("guidance_scale"),
        "num_steps": data.num_steps, "steps": list(range(data.num_steps + 1)),
        "timesteps": [float(t) for t in data.timesteps], "noise_level_name": data.noise_level_name,
        "noise_levels": [float(s) for s in data.noise_levels],
        "samples": [],
    }
    for b in range(data.batch):
        out["samples"].append({
            "prompt": data.prompts[b], "seed": int(data.seeds[b]),
            "pixel_mse": px[:, b].tolist(), "latent_mse": lat[:, b].tolist(),
            "noisy_pixel_mse": noisy_px[:, b].tolist(), "noisy_latent_mse": noisy_lat[:, b].tolist(),
        })
    if completions is not None and steps is not None:
        c_lat = _mse(completions, final_lat[None], (2, 3, 4))                        # [S, B]
        c_px = _mse(completion_images / 255.0, final_px[None], (2, 3, 4)) if completion_images is not None else None
        out["ddim_completion"] = {"num_ddim_steps": completion_steps, "steps": [int(i) for i in steps]}
        for b in range(data.batch):
            sample = out["samples"][b]
            sample["ddim_latent_mse"] = c_lat[:, b].tolist()
            if c_px is not None:
                sample["ddim_pixel_mse"] = c_px[:, b].tolist()
    return out


def render_convergence(path, numbers: dict) -> tuple[int, int]:
    """Two log-scale panels (pixel MSE, latent MSE) against step; one color per sample."""
    import matplotlib
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    axes = fig.subplots(1, 2)
    steps = np.asarray(numbers["steps"])
    t = numbers["num_steps"]
    ddim = numbers.get("ddim_completion")
    colors = matplotlib.colormaps["tab10"].colors
    for ax, key, name in ((axes[0], "pixel", "pixel MSE to the final image"),
                          (axes[1], "latent", "latent MSE to the final latent")):
        for b, sample in enumerate(numbers["samples"]):
            c = colors[b % len(colors)]
            label = sample["prompt"] if len(sample["prompt"]) <= 40 else sample["prompt"][:39] + "…"
            # the last point (the final image, distance 0) has no place on a log axis: mask it
            ax.plot(steps[:-1], np.asarray(sample[f"{key}_mse"])[:-1], "-o", ms=3, color=c, lw=1.8,
                    label=plain(f"{label} (seed {sample['seed']})"))
            ax.plot(steps[:-1], np.asarray(sample[f"noisy_{key}_mse"])[:-1], ":", color=c, lw=1.2, alpha=0.8)
            if ddim and f"ddim_{key}_mse" in sample:
                ax.plot(ddim["steps"], sample[f"ddim_{key}_mse"], "D", ms=6, mfc="none", mew=1.5, color=c)
        ax.set_yscale("log", nonpositive="mask")
        ax.set_xlim(-0.5, t - 0.5)
        ax.set_xlabel(f"step (model call, 0 ... {t - 1}; the final image at step {t} has distance 0)")
        ax.set_ylabel(name)
        ax.grid(True, which="major", alpha=0.3)
        ax.set_title(name)
    from matplotlib.lines import Line2D

    style = [Line2D([], [], color="0.2", marker="o", ms=3, label=r"one-step completion $\hat{x}_0$"),
             Line2D([], [], color="0.2", ls=":", label=r"noisy sample $x_t$ (the usual picture)")]
    if ddim:
        k = ddim["num_ddim_steps"]
        style.append(Line2D([], [], color="0.2", ls="none", marker="D", mfc="none",
                            label=f"completion with {k} DDIM step{'s' if k > 1 else ''}"))
    first = axes[0].legend(handles=style, loc="lower left", fontsize=9, framealpha=0.9)
    axes[0].add_artist(first)
    axes[1].legend(loc="lower left", fontsize=9, framealpha=0.9)
    fig.suptitle(f"Does the one-step completion converge to the final image?  ({numbers['scheduler']}, "
                 f"{t} steps, guidance {numbers['guidance_scale']})", fontsize=13)
    save_figure(fig, path)
    return int(FIGSIZE[0] * DPI), int(FIGSIZE[1] * DPI)
