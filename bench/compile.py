"""Compilation: compile time vs number of steps, recompilations, cold start with/without the persistent cache.

    python bench/compile.py --config tiny --batch 2 --size 64
    python bench/compile.py --config sd15 --batch 1 --size 256 --parts steps,recompiles,coldstart
    python bench/compile.py --config tiny --smoke         # one repeat, no waiting for a quiet machine

Parts (`--parts`, comma-separated):
  steps       For 10, 25 and 50 steps (`--steps-list`), in a fresh subprocess each (no persistent cache):
              jax AOT on the pipeline's own jitted program (`sdjax.pipelines.engine.run_jit`):
              trace+lower time (`fn.lower(*args)`) and XLA compile time (`lowered.compile()`).
              With --first-call also first call minus the median warm call through `pipe(...)`
              (in separate fresh processes: after an AOT compile the jit call reuses the executable).
              The denoising loop is a `lax.scan`, so compile time should not grow with steps.
  recompiles  One process: call `pipe(...)` once, then change guidance, seed, prompts (same batch) and the
              negative prompt, and count XLA backend compilations (jax.monitoring's
              /jax/core/compile/backend_compile_duration events) and the jit cache size. Expect 0.
  coldstart   Process start -> first image (host numpy), fresh subprocesses: 2 with no persistent cache,
              1 that fills an empty cache dir (`enable_compile_cache`), then 2 that find it warm.
              The parent stamps the time before spawning; the child reports when its first image is on the host.
Runs unchanged on a GPU (JAX picks it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

T_PROCESS_START = time.time()  # before heavy imports (the child's own clock; the parent stamps Popen too)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def _pipe(folder):
    import jax.numpy as jnp

    from sdjax.pipelines import FlaxStableDiffusionPipeline

    return FlaxStableDiffusionPipeline.from_pretrained(folder, dtype=jnp.float32)


def _args_for(pipe, batch, prompts=None):
    """(inputs, key) of the pipeline's compiled program, as pipe(...) builds them (random latents)."""
    import jax

    prompts = prompts or (common.PROMPTS * batch)[:batch]
    inputs = pipe.text_inputs(pipe.prepare_inputs(prompts), None, 7.5, jit=False, mesh=None)
    return inputs, jax.random.PRNGKey(0)


def child_steps(a):
    """One steps value in a fresh process: AOT trace+lower and compile times (+ optional first-call - warm)."""
    import jax

    from sdjax.pipelines.engine import Settings, run_jit

    pipe, params = _pipe(a.folder)
    inputs, key = _args_for(pipe, a.batch)
    ids = inputs["prompt_ids"]
    settings = Settings(num_inference_steps=a.steps, height=a.size, width=a.size, return_trajectory=False)
    if a.first_call:  # through pipe(...), in a process that has not compiled anything of this program yet
        def call():
            out = pipe(ids, params, key, num_inference_steps=a.steps, height=a.size, width=a.size,
                       return_trajectory=False)
            return jax.device_get(out.images)

        t = time.perf_counter()
        call()
        first = time.perf_counter() - t
        warm = []
        for _ in range(2):
            t = time.perf_counter()
            call()
            warm.append(time.perf_counter() - t)
        return common.emit(dict(steps=a.steps, first_call_s=first, warm_s=statistics.median(warm),
                                first_minus_warm_s=first - statistics.median(warm)))
    t = time.perf_counter()
    lowered = run_jit.lower(pipe, settings, inputs, params, key)
    lower_s = time.perf_counter() - t
    t = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t
    del compiled
    common.emit(dict(steps=a.steps, lower_s=lower_s, compile_s=compile_s, hlo_chars=len(lowered.as_text())))


def child_recompiles(a):
    import jax

    counts = {"n": 0}

    def listener(event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            counts["n"] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    pipe, params = _pipe(a.folder)
    batch = a.batch

    def call(prompts, seed=0, guidance=7.5, neg=None):
        ids = pipe.prepare_inputs(prompts)
        neg_ids = None if neg is None else pipe.prepare_inputs(neg)
        out = pipe(ids, params, jax.random.PRNGKey(seed), num_inference_steps=a.steps, guidance_scale=guidance,
                   height=a.size, width=a.size, neg_prompt_ids=neg_ids)  # defaults: random latents, trajectory
        jax.block_until_ready(out)

    p0 = (common.PROMPTS * batch)[:batch]
    p1 = list(reversed((common.PROMPTS * 2)[-batch:]))
    n0 = counts["n"]
    call(p0)
    first = counts["n"] - n0
    rows = []
    for what, kw in [("same call again", dict(prompts=p0)),
                     ("guidance 7.5 -> 3.0", dict(prompts=p0, guidance=3.0)),
                     ("guidance as int 5", dict(prompts=p0, guidance=5)),
                     ("seed 0 -> 1", dict(prompts=p0, seed=1)),
                     ("prompts changed (same batch)", dict(prompts=p1)),
                     ("negative prompt given", dict(prompts=p0, neg=["blurry"] * batch)),
                     ("all of them at once", dict(prompts=p1, seed=7, guidance=1.5, neg=["ugly"] * batch))]:
        before = counts["n"]
        call(**kw)
        rows.append(dict(change=what, backend_compiles=counts["n"] - before))
    from sdjax.pipelines.engine import run_jit

    common.emit(dict(first_call_compiles=first, rows=rows, jit_cache_sizes={"run_jit": run_jit._cache_size()}))


def child_coldstart(a):
    """Process start -> first image. Reports the wall-clock time (time.time()) when the image is on the host."""
    t_imp = time.time()
    import jax

    from sdjax.pipelines import FlaxStableDiffusionPipeline
    import jax.numpy as jnp

    t_load = time.time()
    pipe, params = FlaxStableDiffusionPipeline.from_pretrained(
        a.folder, dtype=jnp.float32, compile_cache_dir=None if a.cache == "none" else a.cache)
    t_call = time.time()
    ids = pipe.prepare_inputs((common.PROMPTS * a.batch)[: a.batch])
    out = pipe(ids, params, jax.random.PRNGKey(0), num_inference_steps=a.steps, height=a.size, width=a.size)
    jax.device_get(out.images)
    t_done = time.time()
    common.emit(dict(t_done=t_done, interpreter_start_to_main_s=t_imp - T_PROCESS_START,
                     import_s=t_load - t_imp, load_s=t_call - t_load, first_call_s=t_done - t_call,
                     cache=a.cache))


# ---------------------------------------------------------------- parent
def _child(a, part, extra):
    cmd = [sys.executable, __file__, "--child", part, "--folder", str(a.folder), "--batch", str(a.batch),
           "--size", str(a.size)] + extra
    env = dict(os.environ)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    r = common.run_child(cmd, env=env)
    if "error" in r:
        print(f"[bench] {part} {extra} FAILED: {r['error']}\n{r.get('stderr_tail', '')}", file=sys.stderr)
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny", choices=["tiny", "sd15"])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10, help="steps for the recompile and cold-start parts")
    ap.add_argument("--steps-list", default="10,25,50")
    ap.add_argument("--repeats", type=int, default=2, help="fresh processes per steps value")
    ap.add_argument("--first-call", action="store_true", help="steps part: also first call - warm")
    ap.add_argument("--parts", default="steps,recompiles,coldstart")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--no-wait", action="store_true")
    ap.add_argument("--max-wait", type=float, default=2400)
    ap.add_argument("--json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--cache", default="none", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return {"steps": child_steps, "recompiles": child_recompiles, "coldstart": child_coldstart}[a.child](a)
    if a.smoke:
        a.repeats, a.no_wait = 1, True
    a.folder = common.model_folder(a.config)
    parts = a.parts.split(",")
    quiet = common.wait_quiet(max_wait_s=0 if a.no_wait else a.max_wait)
    s = dict(config=a.config, batch=a.batch, size=a.size, machine=common.machine_info(), quiet=quiet,
             command="python bench/compile.py " + " ".join(sys.argv[1:]))

    if "steps" in parts:
        rows = []
        for steps in [int(x) for x in a.steps_list.split(",")]:
            rs = [_child(a, "steps", ["--steps", str(steps)]) for _ in range(a.repeats)]
            rs = [r for r in rs if "error" not in r]
            if not rs:
                continue
            row = dict(steps=steps, lower=common.stats([r["lower_s"] for r in rs]),
                       compile=common.stats([r["compile_s"] for r in rs]), hlo_chars=rs[0]["hlo_chars"])
            if a.first_call:
                fc = [_child(a, "steps", ["--steps", str(steps), "--first-call"]) for _ in range(a.repeats)]
                fc = [r for r in fc if "error" not in r]
                if fc:
                    row["first_minus_warm"] = common.stats([r["first_minus_warm_s"] for r in fc])
            rows.append(row)
            print(f"[bench] steps {steps}: lower {row['lower']['median']:.2f}s compile {row['compile']['median']:.2f}s",
                  file=sys.stderr)
        s["steps"] = rows
    if "recompiles" in parts:
        s["recompiles"] = _child(a, "recompiles", ["--steps", str(a.steps)])
    if "coldstart" in parts:
        cache_dir = common.CACHE / f"jaxcache-{a.config}-{a.size}-{a.batch}"
        shutil.rmtree(cache_dir, ignore_errors=True)
        runs = []
        for label, cache in [("no cache", "none"), ("no cache", "none"), ("empty cache (fills it)", str(cache_dir)),
                             ("warm cache", str(cache_dir)), ("warm cache", str(cache_dir))]:
            r = _child(a, "coldstart", ["--steps", str(a.steps), "--cache", cache])
            if "error" not in r:
                r["start_to_first_image_s"] = r["t_done"] - r["t_launch"]
                print(f"[bench] coldstart {label}: {r['start_to_first_image_s']:.2f}s", file=sys.stderr)
            r["label"] = label
            runs.append(r)
        s["coldstart"] = runs
        s["coldstart_cache_mb"] = sum(f.stat().st_size for f in cache_dir.rglob("*") if f.is_file()) / 2**20
    s["load_avg_end"] = [round(x, 2) for x in common.load_avg()]
    print(report(s))
    if a.json:
        Path(a.json).write_text(json.dumps(s, indent=1))


def report(s) -> str:
    m = s["machine"]
    out = [f"## compile: {s['config']}, batch {s['batch']}, {s['size']}x{s['size']}, fp32",
           f"{m['date']} | {m['cpu']} x{m['cores']} | jax {m['jax']} ({m['jax_backend']}), flax {m['flax']} | "
           f"load avg start {s['quiet']['load_avg']}{'' if s['quiet']['quiet'] else ' (NOT quiet)'}, "
           f"end {s['load_avg_end']}", f"`{s['command']}`", ""]
    if s.get("steps"):
        base = s["steps"][0]["compile"]["median"]
        fm = "first_minus_warm" in s["steps"][0]
        out += ["| steps | trace+lower (s) | XLA compile (s) median [runs] | compile / first row |"
                + (" first call - warm (s) |" if fm else ""), "|---|---|---|---|" + ("---|" if fm else "")]
        for r in s["steps"]:
            out.append(f"| {r['steps']} | {r['lower']['median']:.2f} | {r['compile']['median']:.2f} {r['compile']['runs']} | "
                       f"{r['compile']['median'] / base:.2f} |" + (f" {r['first_minus_warm']['median']:.2f} |" if fm else ""))
        out.append("")
    rc = s.get("recompiles")
    if rc and "error" not in rc:
        out += [f"Recompilations (backend compiles; first call: {rc['first_call_compiles']}; "
                f"jit cache sizes after all: {rc['jit_cache_sizes']}):", "", "| change | XLA compiles |", "|---|---|"]
        out += [f"| {r['change']} | {r['backend_compiles']} |" for r in rc["rows"]]
        out.append("")
    if s.get("coldstart"):
        out += ["| cold start | process start -> first image (s) | import (s) | load (s) | first call (s) |",
                "|---|---|---|---|---|"]
        for r in s["coldstart"]:
            if "error" in r:
                out.append(f"| {r['label']} | FAILED {r['error'][:100]} ||||")
                continue
            out.append(f"| {r['label']} | {r['start_to_first_image_s']:.2f} | {r['import_s']:.2f} | "
                       f"{r['load_s']:.2f} | {r['first_call_s']:.2f} |")
        cold = [r["start_to_first_image_s"] for r in s["coldstart"] if r["label"] == "no cache" and "error" not in r]
        warm = [r["start_to_first_image_s"] for r in s["coldstart"] if r["label"] == "warm cache" and "error" not in r]
        if cold and warm:
            out.append(f"\nno cache / warm cache: {statistics.median(cold) / statistics.median(warm):.2f}x "
                       f"(cache dir {s['coldstart_cache_mb']:.1f} MiB)")
    return "\n".join(out)


if __name__ == "__main__":
    main()
