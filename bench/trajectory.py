"""Cost of the trajectory: return_trajectory=True vs final-only, and decoding the x̂0 frames.

    python bench/trajectory.py --config tiny --batch 2 --size 64 --steps 10 --runs 10
    python bench/trajectory.py --config sd15 --batch 1 --size 256 --steps 10 --runs 3
    python bench/trajectory.py --config tiny --smoke

One process (sdjax only):
- memory: jax AOT on the pipeline's jitted program for each mode, `compiled.memory_analysis()`
  (argument / output / temp / generated code bytes) -- the device-memory cost of keeping the trajectory;
- time: warm calls of `pipe(...)`, interleaved final-only / trajectory / trajectory + decode_trajectory,
  median and spread per mode; overhead = (mode - final-only) / final-only;
- host RSS: peak RSS (VmHWM, reset through /proc/self/clear_refs before each mode's runs) minus the RSS
  before them, i.e. what a call of that mode adds on the host.
Runs unchanged on a GPU (memory_analysis is then device memory).
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

MODES = {"final only": dict(return_trajectory=False, decode_trajectory=False),
         "trajectory": dict(return_trajectory=True, decode_trajectory=False),
         "trajectory + decode x̂0 frames": dict(return_trajectory=True, decode_trajectory=True)}


def _hwm_reset() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _hwm_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny", choices=["tiny", "sd15"])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--no-wait", action="store_true")
    ap.add_argument("--max-wait", type=float, default=2400)
    ap.add_argument("--json")
    a = ap.parse_args()
    if a.smoke:
        a.runs, a.no_wait = 1, True
    folder = common.model_folder(a.config)

    import jax
    import jax.numpy as jnp

    from sdjax.pipelines.engine import Settings, run_jit
    import numpy as np

    from sdjax.pipelines import FlaxStableDiffusionPipeline

    pipe, params = FlaxStableDiffusionPipeline.from_pretrained(folder, dtype=jnp.float32)
    prompts = (common.PROMPTS * a.batch)[: a.batch]
    ids = pipe.prepare_inputs(prompts)
    key = jax.random.PRNGKey(0)

    # -- compiled memory, per program
    mem = {}
    for ret in (False, True):
        settings = Settings(num_inference_steps=a.steps, height=a.size, width=a.size, return_trajectory=ret)
        inputs = pipe.text_inputs(ids, None, 7.5, jit=False, mesh=None)
        compiled = run_jit.lower(pipe, settings, inputs, params, key).compile()
        ma = compiled.memory_analysis()
        mem[f"return_trajectory={ret}"] = {k: getattr(ma, k) for k in (
            "argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes",
            "generated_code_size_in_bytes") if ma is not None and hasattr(ma, k)}
        del compiled

    def call(mode):
        out = pipe(ids, params, key, num_inference_steps=a.steps, height=a.size, width=a.size, **MODES[mode])
        jax.block_until_ready((out.images, out.trajectory))
        return np.asarray(out.images), out

    _, out = call("trajectory + decode x̂0 frames")  # warm: compiles everything (both programs, frame decoder)
    call("final only")
    n_frames = None if out.frames is None else int(np.prod(out.frames.shape[:2]))
    traj_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(out.trajectory))
    frames_bytes = 0 if out.frames is None else out.frames.nbytes
    del out

    quiet = common.wait_quiet(max_wait_s=0 if a.no_wait else a.max_wait)
    times = {m: [] for m in MODES}
    rss = {m: [] for m in MODES}
    for _ in range(a.runs):
        for m in MODES:
            before = common.rss_mb()
            reset = _hwm_reset()
            t = time.perf_counter()
            call(m)
            times[m].append(time.perf_counter() - t)
            if reset:
                rss[m].append(_hwm_mb() - before)
    base = statistics.median(times["final only"])
    s = dict(config=a.config, batch=a.batch, size=a.size, steps=a.steps, runs=a.runs, machine=common.machine_info(),
             quiet=quiet, load_avg_end=[round(x, 2) for x in common.load_avg()],
             command="python bench/trajectory.py " + " ".join(sys.argv[1:]), memory_analysis=mem,
             trajectory_bytes=traj_bytes, frames=n_frames, frames_bytes=frames_bytes,
             modes={m: dict(time=common.stats(times[m]), overhead=statistics.median(times[m]) / base - 1,
                            rss_peak_delta_mb=max(rss[m]) if rss[m] else None) for m in MODES})
    print(report(s))
    if a.json:
        Path(a.json).write_text(json.dumps(s, indent=1))


def report(s) -> str:
    m = s["machine"]
    mb = lambda b: f"{b / 2**20:.1f}"  # noqa: E731
    out = [f"## trajectory: {s['config']}, batch {s['batch']}, {s['size']}x{s['size']}, {s['steps']} steps, fp32",
           f"{m['date']} | {m['cpu']} x{m['cores']} | jax {m['jax']} ({m['jax_backend']}), flax {m['flax']} | "
           f"load avg {s['quiet']['load_avg']}{'' if s['quiet']['quiet'] else ' (NOT quiet)'}, end {s['load_avg_end']}",
           f"`{s['command']}`", "",
           "| mode | warm median (s) | min-max (s) | spread | overhead vs final-only | host peak RSS added (MiB) |",
           "|---|---|---|---|---|---|"]
    for name, r in s["modes"].items():
        t, d = r["time"], r["rss_peak_delta_mb"]
        out.append(f"| {name} | {t['median']:.3f} | {t['min']:.3f}-{t['max']:.3f} | {t['spread']:.1%} | "
                   f"{r['overhead']:+.1%} | {'-' if d is None else f'{d:.1f}'} |")
    out += ["", f"Trajectory arrays: {mb(s['trajectory_bytes'])} MiB; decoded frames: {s['frames']} "
                f"({mb(s['frames_bytes'])} MiB uint8).", "",
            "| compiled program (memory_analysis, MiB) | arguments | outputs | temp | generated code |",
            "|---|---|---|---|---|"]
    for name, ma in s["memory_analysis"].items():
        out.append(f"| {name} | {mb(ma.get('argument_size_in_bytes', 0))} | {mb(ma.get('output_size_in_bytes', 0))} | "
                   f"{mb(ma.get('temp_size_in_bytes', 0))} | {mb(ma.get('generated_code_size_in_bytes', 0))} |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
