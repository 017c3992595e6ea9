"""Image-to-image: the cost of a run against its strength (one compiled program for every strength).

    python bench/img2img.py --config tiny --batch 2 --size 64 --steps 50 --runs 5
    python bench/img2img.py --config sd15 --batch 1 --size 256 --steps 20 --runs 3
    python bench/img2img.py --config tiny --smoke

One process: warm calls of `FlaxStableDiffusionImg2ImgPipeline(...)` at strengths 1.0, 0.75, 0.5, 0.3,
interleaved; the median time of each against strength 1.0 (target: strength 0.3 at most 0.45x), and the
number of programs compiled (target: 1). The compiled program holds every step; the steps before the start
are skipped by `lax.cond`, so only the calls run cost time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

STRENGTHS = (1.0, 0.75, 0.5, 0.3)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny", choices=["tiny", "sd15"])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--no-wait", action="store_true")
    ap.add_argument("--max-wait", type=float, default=2400)
    ap.add_argument("--json")
    a = ap.parse_args()
    if a.smoke:
        a.runs, a.no_wait, a.steps = 1, True, 10
    folder = common.model_folder(a.config)

    import jax
    import numpy as np

    from sdjax.pipelines import FlaxStableDiffusionImg2ImgPipeline
    from sdjax.pipelines.engine import run_jit

    pipe, params = FlaxStableDiffusionImg2ImgPipeline.from_pretrained(folder, scheduler="ddim")
    prompts = (common.PROMPTS * a.batch)[: a.batch]
    images = np.random.default_rng(0).uniform(0, 1, (a.batch, a.size, a.size, 3)).astype(np.float32)
    ids, image = pipe.prepare_inputs(prompts, images)
    key = jax.random.PRNGKey(0)

    def call(strength):
        out = pipe(ids, image, params, key, strength=strength, num_inference_steps=a.steps, guidance_scale=7.5)
        jax.block_until_ready((out.images, out.trajectory))
        return out.trajectory.pred_original_samples.shape[0]

    compiles_before = run_jit._cache_size()
    steps_run = {s: call(s) for s in STRENGTHS}  # warm-up: compiles once
    compiles = run_jit._cache_size() - compiles_before
    load = None if a.no_wait else common.wait_quiet(a.max_wait)
    times = {s: [] for s in STRENGTHS}
    for _ in range(a.runs):
        for s in STRENGTHS:
            t = time.perf_counter()
            call(s)
            times[s].append(time.perf_counter() - t)
    base = statistics.median(times[1.0])
    rows = [dict(strength=s, steps_run=steps_run[s], median_s=statistics.median(times[s]),
                 ratio_to_strength_1=statistics.median(times[s]) / base, spread=common.stats(times[s]))
            for s in STRENGTHS]
    result = dict(config=a.config, batch=a.batch, size=a.size, steps=a.steps, runs=a.runs, programs_compiled=compiles,
                  rows=rows, load_before=load, machine=common.machine_info())
    print(json.dumps(result, indent=2))
    print("\n| strength | steps run | median (s) | / strength 1.0 |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['strength']} | {r['steps_run']} | {r['median_s']:.3f} | {r['ratio_to_strength_1']:.2f} |")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
