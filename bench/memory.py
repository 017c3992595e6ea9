"""Peak host memory: load a pipeline folder, then make one image; sdjax vs diffusers PyTorch, same folder.

Each peer runs in its own fresh process (peak RSS = the kernel's VmHWM of that process), one after the other:
  sdjax          -- as the `sdjax` command runs it: `limit_host_heap()` (glibc mmap threshold) and
                    `tune_cpu_compiler()` (XLA:CPU flags); the program
                    compiled from the configs first (from_pretrained(abstract=True), pipe.lower(...).compile(), then
                    glibc's free pages returned),
                    then FlaxStableDiffusionPipeline.from_pretrained + one call; both loads with vae_encoder=False
                    (text-to-image never encodes: the VAE's encoder is not read; PyTorch maps the file and never
                    touches those pages either)
  sdjax-command  -- `sdjax generate --model FOLDER` itself (a child process; peak = its ru_maxrss)
  sdjax-library  -- load, then call (compile included: it is part of making the first image), without
                    limit_host_heap() and with the whole VAE: a program that imports sdjax and changes nothing
  torch          -- diffusers StableDiffusionPipeline.from_pretrained (fp32, no safety checker) + one call
Phases: after imports, after loading (peak so far), after the image (peak so far). fp32, PNDM, guidance 7.5.

    python bench/memory.py --config sd15 --size 256 --steps 10
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

PEERS = ("sdjax", "sdjax-command", "sdjax-library", "torch")


def _status() -> dict:
    out = {}
    for line in open("/proc/self/status"):
        key, value = line.split(":", 1)
        if key in ("VmHWM", "VmRSS"):
            out[key] = round(int(value.split()[0]) / 1024)
    return out


def child(peer: str, folder: str, size: int, steps: int) -> dict:
    phases = {"start": _status()}
    if peer == "sdjax-command":
        import resource
        import tempfile

        phases["import"] = phases["start"]
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-m", "sdjax.cli", "generate", "--model", folder, "--prompt",
                            common.PROMPTS[0], "--steps", str(steps), "--height", str(size), "--width", str(size),
                            "--out", f"{tmp}/out"], check=True, capture_output=True)
        peak = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
        phases["load"] = {"VmHWM": None}
        phases["image"] = {"VmHWM": peak, "VmRSS": None}
        return phases
    if peer.startswith("sdjax"):
        if peer == "sdjax":
            from sdjax.compilation import tune_cpu_compiler

            tune_cpu_compiler()  # before JAX starts its CPU backend
        import jax

        from sdjax.io import limit_host_heap, release_free_host_memory
        from sdjax.pipelines import FlaxStableDiffusionPipeline

        ids, key = None, jax.random.PRNGKey(0)
        kw = dict(num_inference_steps=steps, height=size, width=size, return_trajectory=False)
        if peer == "sdjax":
            limit_host_heap()
        phases["import"] = _status()
        load = dict(vae_encoder=False) if peer == "sdjax" else {}
        if peer == "sdjax":
            pipe, shapes = FlaxStableDiffusionPipeline.from_pretrained(folder, abstract=True, **load)
            ids = pipe.prepare_inputs([common.PROMPTS[0]])
            pipe.lower(ids, shapes, key, **kw).compile()
            release_free_host_memory()
            phases["compile"] = _status()
        pipe, params = FlaxStableDiffusionPipeline.from_pretrained(folder, **load)
        phases["load"] = _status()
        ids = pipe.prepare_inputs([common.PROMPTS[0]])
        out = pipe(ids, params, key, **kw)
        jax.block_until_ready(out.images)
    else:
        import torch
        from diffusers import StableDiffusionPipeline

        phases["import"] = _status()
        pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
        phases["load"] = _status()
        with torch.no_grad():
            pipe(common.PROMPTS[0], num_inference_steps=steps, height=size, width=size,
                 generator=torch.Generator().manual_seed(0))
    phases["image"] = _status()
    return phases


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="sd15", choices=["tiny", "sd15"])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--peers", default=",".join(PEERS))
    ap.add_argument("--no-wait", action="store_true")
    ap.add_argument("--max-wait", type=float, default=2400)
    ap.add_argument("--json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    folder = common.model_folder(a.config)
    if a.child:
        print("RESULT " + json.dumps(child(a.child, str(folder), a.size, a.steps)), flush=True)
        return
    quiet = {"quiet": None} if a.no_wait else common.wait_quiet(a.max_wait)
    results = {}
    for peer in a.peers.split(","):
        cmd = [sys.executable, __file__, "--config", a.config, "--size", str(a.size), "--steps", str(a.steps),
               "--child", peer]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit(f"{peer} failed:\n{proc.stderr[-3000:]}")
        results[peer] = json.loads(line[len("RESULT "):])
    summary = dict(machine=common.machine_info(), quiet=quiet, config=a.config, size=a.size, steps=a.steps,
                   command="python bench/memory.py " + " ".join(sys.argv[1:]), results=results)
    print(report(summary))
    if a.json:
        Path(a.json).write_text(json.dumps(summary, indent=2))


def report(s) -> str:
    m = s["machine"]
    lines = [f"### host memory: {s['config']}, load + one {s['size']}x{s['size']} image, {s['steps']} steps, fp32",
             f"{m['date']} | {m['cpu']} x{m['cores']} | jax {m['jax']}, torch {m['torch']}, diffusers {m['diffusers']}",
             f"`{s['command']}`", "",
             "| peer | RSS after imports (MiB) | peak after load (MiB) | peak after the image (MiB) | vs torch |",
             "|---|---|---|---|---|"]
    torch_peak = s["results"].get("torch", {}).get("image", {}).get("VmHWM")
    for peer, r in s["results"].items():
        peak = r["image"]["VmHWM"]
        ratio = f"{peak / torch_peak:.2f}" if torch_peak else "-"
        load = r["load"]["VmHWM"]
        lines.append(f"| {peer} | {r['import']['VmRSS']} | {'-' if load is None else load} | {peak} | {ratio} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
