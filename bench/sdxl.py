"""SDXL-shaped model on the host: sdjax vs diffusers PyTorch, time (load, first call, warm call), compile time,
peak host memory, image agreement; same folder, scheduler, prompt, latents.

    python bench/sdxl.py --size 512 --steps 10 --no-wait
    python bench/sdxl.py --size 512 --steps 4 --no-wait --json /tmp/sdxl.json   # fewer steps on a busy machine

The model is `common.model_folder("sdxl")`: SDXL base 1.0's real UNet / VAE / text_encoder / text_encoder_2
configs with random weights (2.57 B + 83.7 M + 123 M + 695 M parameters, ~14 GB fp32), saved by
diffusers/transformers PyTorch as safetensors and cached in $SDJAX_BENCH_CACHE. Each peer runs in its own fresh
subprocess, one after the other (never both at once: each holds ~14 GB of fp32 weights):
  sdjax  -- as the `sdjax` command runs it: `limit_host_heap()`, FlaxStableDiffusionXLPipeline.from_pretrained
            (float32), then pipe(ids, params, key, latents=..., return_trajectory=False) (jax.jit, one program)
  torch  -- diffusers StableDiffusionXLPipeline.from_pretrained (float32, no watermarker) under inference_mode,
            output_type="np"
Both: batch 1, the folder's EulerDiscreteScheduler (SDXL's default), guidance 5.0, no negative prompt (SDXL's
force_zeros_for_empty_prompt: zero unconditional embeddings), default micro-conditioning (original = target
size = the image size, crop (0, 0)), the same initial latents. Per peer: load time, the first call (compile
included for sdjax), `--runs` warm calls, peak RSS (VmHWM) after load and after the calls, and for sdjax the
time jax spent tracing, lowering and compiling inside the first call (jax.monitoring events). The images are
compared (max abs difference, pixel values in [0, 1]).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

PEERS = ("sdjax", "torch")
PROMPT = common.PROMPTS[0]
GUIDANCE = 5.0
COMPILE_EVENTS = {"/jax/core/compile/jaxpr_trace_duration": "trace",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
                  "/jax/core/compile/backend_compile_duration": "compile"}


def _status() -> dict:
    out = {}
    for line in open("/proc/self/status"):
        key, value = line.split(":", 1)
        if key in ("VmHWM", "VmRSS"):
            out[key] = round(int(value.split()[0]) / 1024)
    return out


def make_latents(size: int, seed: int = 0):
    import numpy as np

    return np.random.default_rng(seed).standard_normal((1, 4, size // 8, size // 8)).astype("float32")


def child(a) -> dict:
    """One peer in this (fresh) process; writes its image to --out-dir and partial results as it goes."""
    import numpy as np

    res = dict(peer=a.child, phases={"start": _status()})
    partial = Path(a.out_dir) / f"{a.child}.partial.json"

    def note(**kw):
        res.update(kw)
        partial.write_text(json.dumps(res))
        print(f"[bench] {a.child}: {kw}", file=sys.stderr, flush=True)

    latents = make_latents(a.size)
    if a.child == "sdjax":
        import jax
        import jax.numpy as jnp

        from sdjax.io import limit_host_heap
        from sdjax.pipelines import FlaxStableDiffusionXLPipeline

        limit_host_heap()
        compile_s = {v: 0.0 for v in COMPILE_EVENTS.values()}

        def listener(event, duration, **_):
            if event in COMPILE_EVENTS:
                compile_s[COMPILE_EVENTS[event]] += duration

        jax.monitoring.register_event_duration_secs_listener(listener)
        res["phases"]["import"] = _status()
        t = time.perf_counter()
        pipe, params = FlaxStableDiffusionXLPipeline.from_pretrained(a.folder, dtype=jnp.float32)
        params = jax.block_until_ready(jax.device_put(params))
        note(load_s=time.perf_counter() - t, scheduler=type(pipe.scheduler).__name__)
        res["phases"]["load"] = _status()
        lat = jnp.asarray(latents)

        def call():
            ids = pipe.prepare_inputs([PROMPT])
            out = pipe(ids, params, jax.random.PRNGKey(0), num_inference_steps=a.steps, guidance_scale=GUIDANCE,
                       height=a.size, width=a.size, latents=lat, return_trajectory=False)
            return np.asarray(out.images)
    else:
        import torch
        from diffusers import StableDiffusionXLPipeline

        res["phases"]["import"] = _status()
        t = time.perf_counter()
        pipe = StableDiffusionXLPipeline.from_pretrained(a.folder, torch_dtype=torch.float32, add_watermarker=False)
        pipe.set_progress_bar_config(disable=True)
        note(load_s=time.perf_counter() - t, scheduler=type(pipe.scheduler).__name__,
             torch_threads=torch.get_num_threads(),
             attn_processor=type(next(iter(pipe.unet.attn_processors.values()))).__name__)
        res["phases"]["load"] = _status()
        lat = torch.from_numpy(latents)

        def call():
            with torch.inference_mode():
                out = pipe(prompt=PROMPT, num_inference_steps=a.steps, guidance_scale=GUIDANCE, height=a.size,
                           width=a.size, latents=lat, output_type="np")
            return np.asarray(out.images)

    t = time.perf_counter()
    images = call()
    cold = time.perf_counter() - t
    np.save(Path(a.out_dir) / f"{a.child}.npy", images.astype(np.float32))
    res["phases"]["first_call"] = _status()
    note(cold_s=cold, image_shape=list(images.shape), image_finite=bool(np.isfinite(images).all()),
         **({"compile_s": dict(compile_s, total=sum(compile_s.values()))} if a.child == "sdjax" else {}))
    warm = []
    for _ in range(a.runs):
        t = time.perf_counter()
        call()
        warm.append(time.perf_counter() - t)
        note(warm_s=warm)
    res["phases"]["end"] = _status()
    note(peak_rss_mb=res["phases"]["end"]["VmHWM"])
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--runs", type=int, default=1, help="warm calls per peer after the first")
    ap.add_argument("--peers", default=",".join(PEERS))
    ap.add_argument("--timeout", type=float, default=3600, help="per peer (s); partial figures are kept")
    ap.add_argument("--no-wait", action="store_true")
    ap.add_argument("--max-wait", type=float, default=2400)
    ap.add_argument("--json")
    ap.add_argument("--child", choices=PEERS, help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--out-dir", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        common.emit(child(a))
        return

    folder = common.model_folder("sdxl")
    out_dir = common.CACHE / f"images-sdxl-{a.size}-{a.steps}"
    out_dir.mkdir(parents=True, exist_ok=True)
    quiet = common.wait_quiet(max_wait_s=0 if a.no_wait else a.max_wait)
    info = common.machine_info()
    results = {}
    for peer in [p for p in a.peers.split(",") if p]:
        for f in (out_dir / f"{peer}.npy", out_dir / f"{peer}.partial.json"):
            f.unlink(missing_ok=True)
        cmd = [sys.executable, __file__, "--child", peer, "--folder", str(folder), "--out-dir", str(out_dir),
               "--size", str(a.size), "--steps", str(a.steps), "--runs", str(a.runs)]
        load_before = common.load_avg()
        print(f"[bench] {peer}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
        t0 = time.time()
        try:
            r = common.run_child(cmd, timeout=a.timeout)
        except subprocess.TimeoutExpired:
            r = dict(error=f"timed out after {a.timeout:.0f} s")
        if "error" in r:  # keep what the child measured before it failed or ran out of time
            part = out_dir / f"{peer}.partial.json"
            r = (json.loads(part.read_text()) if part.exists() else {}) | r
            print(f"[bench] {peer} FAILED: {r['error']}\n{r.get('stderr_tail', '')}", file=sys.stderr)
        r["wall_s"] = time.time() - t0
        r["load_avg_before"] = [round(x, 2) for x in load_before]
        r["load_avg_after"] = [round(x, 2) for x in common.load_avg()]
        results[peer] = r

    import numpy as np

    diff = None
    if (out_dir / "sdjax.npy").exists() and (out_dir / "torch.npy").exists():
        diff = float(np.abs(np.load(out_dir / "sdjax.npy") - np.load(out_dir / "torch.npy")).max())
    summary = dict(size=a.size, steps=a.steps, runs=a.runs, guidance=GUIDANCE, machine=info, quiet=quiet,
                   command="python bench/sdxl.py " + " ".join(sys.argv[1:]), results=results,
                   max_abs_image_diff=diff)
    s, o = results.get("sdjax", {}), results.get("torch", {})
    if s.get("warm_s") and o.get("warm_s"):
        summary["ratio_warm"] = min(s["warm_s"]) / min(o["warm_s"])
    if s.get("cold_s") and o.get("cold_s"):
        summary["ratio_first_call"] = s["cold_s"] / o["cold_s"]
    print(report(summary))
    if a.json:
        Path(a.json).write_text(json.dumps(summary, indent=1))


def report(s) -> str:
    m = s["machine"]
    q = s["quiet"]
    lines = [f"### sdxl-shaped: batch 1, {s['size']}x{s['size']}, {s['steps']} Euler steps, guidance {s['guidance']}, "
             "fp32, CPU",
             f"{m['date']} | {m['cpu']} x{m['cores']} | jax {m['jax']} ({m['jax_backend']}), "
             f"diffusers {m['diffusers']}, torch {m['torch']} | load avg at start {q['load_avg']}"
             f"{'' if q['quiet'] else ' (NOT quiet: ' + str(len(q['busy'])) + ' busy processes)'}",
             f"`{s['command']}`", "",
             "| peer | load (s) | first call (s) | of which trace+lower+compile (s) | warm call (s) | "
             "peak RSS after load (MiB) | peak RSS (MiB) | load avg 1/5/15 before -> after |",
             "|---|---|---|---|---|---|---|---|"]

    def f(x, fmt="{:.1f}"):
        return "-" if x is None else fmt.format(x)

    for peer, r in s["results"].items():
        c = r.get("compile_s")
        comp = "-" if not c else f"{c['total']:.1f} ({c['trace']:.1f} + {c['lower']:.1f} + {c['compile']:.1f})"
        warm = r.get("warm_s") or []
        lines.append(f"| {peer}{' (FAILED: ' + r['error'][:120] + ')' if 'error' in r else ''} | "
                     f"{f(r.get('load_s'))} | {f(r.get('cold_s'))} | {comp} | "
                     f"{', '.join(f'{w:.1f}' for w in warm) or '-'} | "
                     f"{r.get('phases', {}).get('load', {}).get('VmHWM', '-')} | {r.get('peak_rss_mb', '-')} | "
                     f"{r['load_avg_before']} -> {r['load_avg_after']} |")
    lines.append("")
    if "ratio_warm" in s:
        lines.append(f"- sdjax / torch, warm call: {s['ratio_warm']:.2f}")
    if "ratio_first_call" in s:
        lines.append(f"- sdjax / torch, first call (sdjax's compile included): {s['ratio_first_call']:.2f}")
    lines.append(f"- max abs image difference sdjax vs torch (pixels in [0, 1]): "
                 f"{'-' if s['max_abs_image_diff'] is None else format(s['max_abs_image_diff'], '.2e')}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
