"""The paper's compression-factor study at toy scale: f in {1, 2, 4, 8} (16 at 64x64), the same wall-clock each.

    sdjax train compression-study --out runs/compression --ae-seconds 150 --ldm-seconds 300
    sdjax train compression-study --out runs/compression_64 --image-size 64 --factors 4 8 16

For each f: a short timing run measures steps/s of each stage, the step counts are set so that each stage
fits its budget, both stages are trained, and the model is evaluated (PSNR, stage-2 images/s, FD,
color/shape adherence at guidance 5). Writes OUT/results.json (resumable: finished factors are skipped) and
a table + plot (--report, e.g. docs/compression.md, whose text above `<!-- results -->` is kept).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from sdjax.errors import ConfigError
from sdjax.io import atomic_write, write_json

from . import autoencoder, evaluate, ldm
from .config import build_config, load_config

WIDTHS = {1: [16], 2: [16, 32], 4: [16, 32, 64], 8: [16, 32, 64, 64], 16: [16, 32, 64, 64, 64]}  # VAE blocks


def steps_per_second(train_fn, cfg_schema, base: dict, workdir: Path, probe_steps: int = 15) -> float:
    """Steps/s of a stage after compilation (3 warm-up steps, then probe_steps timed)."""
    cfg = build_config(cfg_schema, base | {"num_steps": 10**6, "checkpoint_every": 0})
    train_fn(cfg, workdir, until_step=3, progress=False)
    summary = train_fn(cfg, workdir, until_step=3 + probe_steps, progress=False)
    return probe_steps / summary["train_seconds_this_run"]


def run_factor(f: int, out: Path, ae_seconds: float, ldm_seconds: float, per_caption: int, classifier_dir: str,
               image_size: int = 32) -> dict:
    ae_base = load_config(autoencoder.Config, "shapes_autoencoder")
    ae_over = {"vae": dict(ae_base.vae, block_out_channels=WIDTHS[f]), "checkpoint_every": 0, "image_size": image_size}
    ae_vals = {k: v for k, v in vars(ae_base).items()} | ae_over
    # timing probe (steps are restarted from scratch in a fresh workdir afterwards)
    probe = out / f"f{f}_probe"
    shutil.rmtree(probe, ignore_errors=True)
    ae_sps = steps_per_second(autoencoder.train_and_evaluate, autoencoder.Config, ae_vals, probe / "ae")
    ae_steps = max(50, int(ae_sps * ae_seconds))
    ae_dir = out / f"f{f}_ae"
    t0 = time.time()
    ae_summary = autoencoder.train_and_evaluate(build_config(autoencoder.Config, ae_vals | {
        "num_steps": ae_steps, "warmup_steps": min(100, ae_steps // 10)}), ae_dir, progress=False)
    ae_time = time.time() - t0

    ldm_base = load_config(ldm.Config, "shapes_ldm")
    ldm_vals = vars(ldm_base) | {"autoencoder_dir": str(ae_dir), "checkpoint_every": 0, "image_size": image_size}
    sps = steps_per_second(lambda c, w, **k: ldm.train_and_evaluate(c, w, export=False, **k), ldm.Config,
                              ldm_vals, probe / "ldm")
    ldm_steps = max(50, int(sps * ldm_seconds))
    ldm_dir = out / f"f{f}_ldm"
    t0 = time.time()
    ldm_summary = ldm.train_and_evaluate(build_config(ldm.Config, ldm_vals | {
        "num_steps": ldm_steps, "warmup_steps": min(100, ldm_steps // 10)}), ldm_dir, progress=False)
    ldm_time = time.time() - t0
    ev = evaluate.evaluate(ldm_dir / "pipeline", classifier_dir, guidance=5.0, steps=25, per_caption=per_caption,
                           out_dir=out / f"f{f}_eval")
    shutil.rmtree(probe, ignore_errors=True)
    return {"f": f, "image_size": image_size, "latent_shape": [4, image_size // f, image_size // f], "ae_steps": ae_steps, "ae_seconds": ae_time,
            "psnr_db": ae_summary["psnr_db"], "ldm_steps": ldm_steps, "ldm_seconds": ldm_time,
            "ldm_images_per_s": ldm_summary["images_per_s_this_run"], "ldm_final_loss": ldm_summary["final_loss_mean_last_5_logs"],
            "fd": ev["fd_generated_vs_real"], "fd_real_vs_real": ev["fd_real_vs_real"],
            "color_acc": ev["adherence"]["color"], "shape_acc": ev["adherence"]["shape"],
            "background_acc": ev["adherence"]["background"]}


def write_report(results: dict, md_path: Path, png_path: Path, note: str = "") -> None:
    from matplotlib.figure import Figure  # not pyplot: no window, and a notebook's backend is left alone

    rows = [results[k] for k in sorted(results, key=int)]
    fs = [r["f"] for r in rows]
    fig = Figure(figsize=(16, 3.4))
    axes = fig.subplots(1, 4)
    for ax, (key, label) in zip(axes, (("psnr_db", "reconstruction PSNR (dB)"), ("ldm_images_per_s", "stage-2 images/s"),
                                      ("fd", "FD (generated vs real)"), ("color_acc", "adherence"))):
        ax.plot(fs, [r[key] for r in rows], "o-", label=key.replace("_acc", ""))
        if key == "color_acc":
            ax.plot(fs, [r["shape_acc"] for r in rows], "s-", label="shape")
            ax.legend()
        ax.set_xscale("log", base=2)
        if key in ("ldm_images_per_s", "fd"):
            ax.set_yscale("log")
        ax.set_xticks(fs, [str(f) for f in fs])
        ax.set_xlabel("downsampling factor f")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(png_path, lambda f: fig.savefig(f, format="png", dpi=90))
    lines = ["| f | latents | stage 1 steps | PSNR (dB) | stage 2 steps | stage 2 images/s | final loss | FD | FD real/real | color acc | shape acc |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['f']} | {'x'.join(map(str, r['latent_shape']))} | {r['ae_steps']} | {r['psnr_db']:.2f} | "
                     f"{r['ldm_steps']} | {r['ldm_images_per_s']:.0f} | {r['ldm_final_loss']:.4f} | {r['fd']:.2f} | "
                     f"{r['fd_real_vs_real']:.2f} | {r['color_acc']:.1%} | {r['shape_acc']:.1%} |")
    table = "\n".join(lines) + f"\n\n![compression study]({png_path.name})\n"
    head = md_path.read_text().split("<!-- results -->")[0] if md_path.is_file() else "# Compression factor study\n\n"
    md_path.write_text(head + "<!-- results -->\n\n" + table + (f"\n{note}\n" if note else ""))


def run_study(out, factors=(1, 2, 4, 8), image_size: int = 32, ae_seconds: float = 150, ldm_seconds: float = 300,
              per_caption: int = 2, classifier_dir: str = "runs/shapes_classifier", report=None) -> Path:
    """Every factor not yet in OUT/results.json, then the report (markdown table + plot). Returns the report."""
    out = Path(out)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    for f in factors:  # all checked before any training starts
        if f not in WIDTHS:
            raise ConfigError(f"factor {f}: choose from {', '.join(map(str, sorted(WIDTHS)))}")
        if image_size // f < 2:
            raise ConfigError(f"f={f} leaves {image_size // f}x{image_size // f} latents of {image_size}x{image_size} "
                              f"images; the UNet needs at least 2x2 (use --image-size 64)")
        done_size = results.get(str(f), {}).get("image_size", 32)  # results from before sizes were recorded: 32
        if str(f) in results and done_size != image_size:
            raise ConfigError(f"{results_path} holds f={f} at {done_size}x{done_size}; "
                              f"use another --out for --image-size {image_size}")
    out.mkdir(parents=True, exist_ok=True)
    for f in factors:
        if str(f) in results:
            continue
        results[str(f)] = run_factor(f, out, ae_seconds, ldm_seconds, per_caption, classifier_dir, image_size)
        write_json(results_path, results)
        print(json.dumps(results[str(f)]), flush=True)
    md = Path(report or out / "compression.md")
    write_report(results, md, md.with_suffix(".png"))
    return md
