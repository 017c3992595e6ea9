"""Classifier guidance vs classifier-free guidance vs both, on the toy model (docs/guidance.md).

    sdjax train guidance-study --out runs/guidance --report docs/guidance.md

Every setting generates the same images: the 54 shapes captions x `per_caption`, image i from the noise of seed i
(DDIM, 25 steps), in one compiled program for all settings (prompts, labels and both scales are traced):

* cfg:        the caption, classifier-free guidance w, no classifier (s = 0);
* classifier: an empty prompt (the unconditional model), classifier guidance toward the caption's color, shape and
              background at scale s;
* both:       the caption at CFG w, plus classifier guidance at s.

Each is scored by `sdjax.train.evaluate`'s evaluation classifier (pixels, clean images, its own data: a different
model from the guiding one): color / shape / background adherence and the Frechet distance of its features to real
held-out images. Then, for one setting of each kind, the one-step completions x̂0 of every step are decoded and
classified, showing at which step each kind of guidance has decided the color and the shape.

Writes OUT/results.json (resumable: finished settings are skipped), and the report (--report: markdown table
between `<!-- results -->` and `<!-- /results -->`, the rest of the file kept) with REPORT-stem.png (adherence
against FD), REPORT-stem_steps.png (adherence of x̂0 per step) and REPORT-stem_completions.png (x̂0 pictures).
"""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path

import numpy as np

from sdjax.assets import toy_classifier_path, toy_model_path
from sdjax.errors import ConfigError
from sdjax.io import atomic_write, write_json
from sdjax.pipelines import FlaxStableDiffusionClassifierGuidedPipeline
from sdjax.seeds import initial_noise, loop_key, sample_seeds

from . import data as data_lib
from . import evaluate

# (kind, CFG w, classifier scale s): the settings of the study
CFG_SCALES = (1.0, 2.0, 3.0, 5.0, 7.5)
CLASSIFIER_SCALES = (0.0, 1.0, 2.0, 4.0, 6.0, 8.0, 16.0)
BOTH = ((2.0, 1.0), (2.0, 2.0), (2.0, 4.0), (2.0, 8.0), (5.0, 2.0), (5.0, 4.0))
# the settings whose one-step completions are decoded and classified at every step
STEP_SETTINGS = ("cfg_w5", "classifier_s4", "both_w2_s4")
KIND_STYLE = {"cfg": ("tab:blue", "o"), "classifier": ("tab:red", "s"), "both": ("tab:purple", "^")}


def settings() -> dict[str, dict]:
    out = {f"cfg_w{w:g}": {"kind": "cfg", "w": w, "s": 0.0} for w in CFG_SCALES}
    out |= {f"classifier_s{s:g}": {"kind": "classifier", "w": 1.0, "s": s} for s in CLASSIFIER_SCALES}
    out |= {f"both_w{w:g}_s{s:g}": {"kind": "both", "w": w, "s": s} for w, s in BOTH}
    return out


class Study:
    """The pipeline, the evaluation classifier, the captions/labels/noise of every image, the real features."""

    def __init__(self, model, classifier, classifier_dir: str, per_caption: int, steps: int, seed: int):
        self.pipe, self.params = FlaxStableDiffusionClassifierGuidedPipeline.from_pretrained(
            model, classifier=classifier)
        self.steps, self.size = steps, self.pipe.default_size
        combos = [combo for combo, _ in data_lib.all_shape_captions()] * per_caption
        self.labels = np.array(combos, np.int32)  # [N, 3] color, shape, background: the classifier's heads' order
        if self.pipe.classifier.heads != ("color", "shape", "background"):
            raise ConfigError(f"the guiding classifier's heads are {self.pipe.classifier.heads}; the study needs "
                              "color, shape, background (a classifier trained by sdjax train classifier)")
        self.captions = [data_lib.caption_for(*c) for c in combos]
        self.latents = initial_noise(sample_seeds(seed, range(len(combos))), self.pipe.latent_shape(1, self.size,
                                                                                                   self.size)[1:])
        self.seed = seed
        self.eval_params = evaluate.load_or_train_classifier(classifier_dir, self.size)
        real = data_lib.shapes_dataset(1000, seed=0, image_size=self.size, start=data_lib.HELD_OUT_START)
        real2 = data_lib.shapes_dataset(len(combos), seed=2, image_size=self.size, start=data_lib.HELD_OUT_START)
        self.real_feats, real_preds = evaluate.predict(self.eval_params, real.images)
        self.eval_accuracy = evaluate.accuracies(real_preds, real.labels)
        self.fd_floor = evaluate.frechet_distance(evaluate.predict(self.eval_params, real2.images)[0], self.real_feats)

    def run(self, setting: dict, return_trajectory: bool = False):
        prompts = self.captions if setting["kind"] != "classifier" else [""] * len(self.captions)
        return self.pipe(self.pipe.prepare_inputs(prompts), self.params, loop_key(self.seed),
                         num_inference_steps=self.steps, guidance_scale=setting["w"], latents=self.latents,
                         labels=self.labels, classifier_scale=setting["s"], return_trajectory=return_trajectory)

    def score(self, images_uint8) -> dict:
        feats, preds = evaluate.predict(self.eval_params, images_uint8)
        return {"adherence": evaluate.accuracies(preds, self.labels),
                "fd": evaluate.frechet_distance(feats, self.real_feats)}


def to_uint8(images) -> np.ndarray:
    return np.round(np.asarray(images) * 255).astype(np.uint8)


def step_adherence(study: Study, out) -> dict:
    """Adherence of the decoded x̂0 of every step, to the asked labels and to the final image's classes."""
    x0 = np.asarray(out.trajectory.pred_original_samples)  # [T, N, C, h, w]
    frames = study.pipe.decode_frames(study.params["vae"], x0, chunk_size=256, progress=False)  # [T, N, H, W, 3]
    _, final = evaluate.predict(study.eval_params, to_uint8(out.images))
    result = {"target": {h: [] for h, _ in evaluate.HEADS}, "final": {h: [] for h, _ in evaluate.HEADS},
              "noise_levels": np.asarray(out.trajectory.noise_levels).tolist(),
              "timesteps": np.asarray(out.trajectory.timesteps).tolist()}
    for t in range(frames.shape[0]):
        _, preds = evaluate.predict(study.eval_params, frames[t])
        for k, (h, _) in enumerate(evaluate.HEADS):
            result["target"][h].append(float(np.mean(preds[h] == study.labels[:, k])))
            result["final"][h].append(float(np.mean(preds[h] == final[h])))
    return result, frames


def run_study(out, report=None, model=None, classifier=None, classifier_dir: str = "runs/shapes_classifier",
              per_caption: int = 4, steps: int = 25, seed: int = 0, examples: int = 4) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    meta = {"model": str(model or "toy"), "classifier": str(classifier or "toy"), "per_caption": per_caption,
            "steps": steps, "seed": seed}
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    if results and results.get("meta") != meta:
        raise ConfigError(f"{results_path} holds a study with other settings ({results.get('meta')}); use another "
                          "--out")
    results["meta"] = meta
    study = Study(model or toy_model_path(), classifier or toy_classifier_path(), classifier_dir, per_caption, steps,
                  seed)
    results["evaluation_classifier_held_out_accuracy"] = study.eval_accuracy
    results["fd_real_vs_real"] = study.fd_floor
    rows = results.setdefault("settings", {})
    for name, setting in settings().items():
        if name in rows:
            continue
        t0, load0 = time.time(), os.getloadavg()[0]
        images = to_uint8(study.run(setting).images)
        rows[name] = setting | study.score(images) | {"seconds": time.time() - t0,
                                                      "load_average": [load0, os.getloadavg()[0]]}
        write_json(results_path, results)
        print(name, json.dumps(rows[name]), flush=True)
        if name in STEP_SETTINGS or name == "classifier_s0":
            np.save(out / f"images_{name}.npy", images)
    md = Path(report or out / "guidance.md")
    pictures = {}
    steps_done = results.setdefault("steps", {})
    for name in STEP_SETTINGS:
        if name in steps_done and (out / f"x0_{name}.npy").is_file():
            continue
        run = study.run(settings()[name], return_trajectory=True)
        steps_done[name], frames = step_adherence(study, run)
        np.save(out / f"x0_{name}.npy", frames[:, _example_indices(examples)])
        write_json(results_path, results)
    for name in STEP_SETTINGS:
        pictures[name] = np.load(out / f"x0_{name}.npy")
    write_report(results, md, pictures, study)
    return md


def _example_indices(n: int) -> np.ndarray:
    """Images of the completions picture: n captions with different colors, shapes and backgrounds (first copy)."""
    combos = [combo for combo, _ in data_lib.all_shape_captions()]
    wanted = [(0, 1, 1), (2, 0, 0), (3, 2, 2), (5, 1, 0), (4, 0, 2), (1, 2, 1)][:n]  # (color, shape, background)
    return np.array([combos.index(w) for w in wanted])


def write_report(results: dict, md_path: Path, pictures: dict, study: Study) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["settings"]
    floor = results["fd_real_vs_real"]
    plot_path = md_path.with_name(md_path.stem + ".png")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, head in zip(axes, ("color", "shape", "background")):
        for kind, (color, marker) in KIND_STYLE.items():
            pts = [(r["fd"], r["adherence"][head], r) for r in rows.values() if r["kind"] == kind]
            if kind == "both":
                for w in sorted({r["w"] for _, _, r in pts}):
                    sub = sorted([p for p in pts if p[2]["w"] == w], key=lambda p: p[2]["s"])
                    ax.plot([p[0] for p in sub], [p[1] for p in sub], marker=marker, color=color,
                            ls="-" if w == 2 else "--", label=f"both (CFG w={w:g}, s varies)")
                    for x, y, r in sub:
                        ax.annotate(f"s{r['s']:g}", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7,
                                    color=color)
                continue
            key = "w" if kind == "cfg" else "s"
            pts.sort(key=lambda p: p[2][key])
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=color,
                    label="classifier-free (w varies)" if kind == "cfg" else "classifier, empty prompt (s varies)")
            for x, y, r in pts:
                ax.annotate(f"{key}{r[key]:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7,
                            color=color)
        ax.axvline(floor, color="gray", ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_xlabel("FD to real images (log; dotted: real vs real)")
        ax.set_ylabel(f"{head} adherence")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.set_title(f"{head}: adherence vs FD")
    axes[0].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    atomic_write(plot_path, lambda f: fig.savefig(f, format="png", dpi=90))
    plt.close(fig)

    steps_path = md_path.with_name(md_path.stem + "_steps.png")
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, head in zip(axes, ("color", "shape")):
        for name in STEP_SETTINGS:
            r = results["steps"][name]
            kind = rows[name]["kind"]
            color, marker = KIND_STYLE[kind]
            x = np.arange(1, len(r["target"][head]) + 1)
            ax.plot(x, r["target"][head], marker=marker, ms=3, color=color, label=f"{_label(rows[name])}: asked")
            ax.plot(x, r["final"][head], ls=":", color=color, label=f"{_label(rows[name])}: = final image")
        ax.set_xlabel("step (DDIM, 25 steps)")
        ax.set_ylabel(f"x̂0's {head} (evaluation classifier)")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.set_title(f"when is the {head} decided?")
    axes[1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    atomic_write(steps_path, lambda f: fig.savefig(f, format="png", dpi=90))
    plt.close(fig)

    grid_path = md_path.with_name(md_path.stem + "_completions.png")
    write_completions(grid_path, pictures, rows, study)

    lines = ["| setting | prompt | CFG w | classifier s | color | shape | background | FD |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        prompt = "(empty)" if r["kind"] == "classifier" else "caption"
        a = r["adherence"]
        lines.append(f"| {name} | {prompt} | {r['w']:g} | {r['s']:g} | {a['color']:.1%} | {a['shape']:.1%} | "
                     f"{a['background']:.1%} | {r['fd']:.0f} |")
    meta = results["meta"]
    n = meta["per_caption"] * 54
    table = "\n".join(lines) + (
        f"\n\n{n} images per setting ({meta['per_caption']} per caption, the same noise in every setting), DDIM "
        f"{meta['steps']} steps; FD real vs real (as many real images): {floor:.0f}; the evaluation classifier's "
        f"held-out accuracy: " + ", ".join(f"{h} {v:.1%}" for h, v in
                                           results["evaluation_classifier_held_out_accuracy"].items())
        + f".\n\n![adherence vs FD]({plot_path.name})\n\n![x̂0 per step]({steps_path.name})\n\n"
        f"![one-step completions]({grid_path.name})\n")
    text = md_path.read_text() if md_path.is_file() else "# Classifier guidance\n\n<!-- results -->\n<!-- /results -->\n"
    if "<!-- results -->" not in text:
        text += "\n<!-- results -->\n<!-- /results -->\n"
    head, rest = text.split("<!-- results -->", 1)
    tail = rest.split("<!-- /results -->", 1)[1] if "<!-- /results -->" in rest else ""
    md_path.write_text(head + "<!-- results -->\n\n" + table + "\n<!-- /results -->" + tail)


def _label(r: dict) -> str:
    if r["kind"] == "cfg":
        return f"CFG w={r['w']:g}"
    if r["kind"] == "classifier":
        return f"classifier s={r['s']:g}"
    return f"both w={r['w']:g} s={r['s']:g}"


def write_completions(path: Path, pictures: dict, rows: dict, study: Study, columns: int = 9) -> None:
    """Rows: each example x each kind; columns: x̂0 at evenly spread steps (the last is the final x̂0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(pictures)
    t = pictures[names[0]].shape[0]
    cols = sorted({int(round(x)) for x in np.linspace(0, t - 1, columns)})
    examples = pictures[names[0]].shape[1]
    idx = _example_indices(examples)
    fig, axes = plt.subplots(examples * len(names), len(cols), figsize=(1.1 * len(cols) + 2.2,
                                                                        1.1 * examples * len(names) + 0.6),
                             squeeze=False)
    for e in range(examples):
        for k, name in enumerate(names):
            row = e * len(names) + k
            for c, step in enumerate(cols):
                ax = axes[row, c]
                ax.imshow(pictures[name][step, e])
                ax.set_xticks([])
                ax.set_yticks([])
                if row == 0:
                    ax.set_title(f"step {step + 1}", fontsize=8)
            caption = study.captions[idx[e]].replace(" on a ", "\non ").replace("a ", "", 1)
            axes[row, 0].set_ylabel(f"{_label(rows[name])}\n{caption}" if k == 0 else _label(rows[name]),
                                    fontsize=7, rotation=0, ha="right", va="center")
    fig.suptitle("one-step completions x̂0 (decoded) of the same noise under each guidance", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    from PIL import Image

    buf.seek(0)  # a 256-color palette, dithered: 40% of the bytes, no visible banding
    picture = Image.open(buf).convert("RGB")
    picture = picture.quantize(palette=picture.quantize(256), dither=Image.Dither.FLOYDSTEINBERG)
    atomic_write(path, lambda f: picture.save(f, format="png", optimize=True))
