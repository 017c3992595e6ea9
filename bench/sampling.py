"""Sampling speed: sdjax vs diffusers PyTorch vs diffusers 0.35 Flax (old Flax), same model, same everything.

    python bench/sampling.py --config tiny --batch 2 --size 64  --steps 10 --runs 10
    python bench/sampling.py --config sd15 --batch 1 --size 256 --steps 10 --runs 3
    python bench/sampling.py --config tiny --smoke          # 1 warm run, no waiting for a quiet machine

Every peer runs in its own fresh subprocess (so cold = the first call in a new process, compile included,
and peers don't share memory or thread pools), on the same random-weight folder (diffusers PyTorch wrote it,
safetensors; the old-Flax peer gets a .bin copy with `text_model.` keys), the same PNDM scheduler config,
prompts, guidance 7.5, steps, batch, resolution and the same initial latents (so the images can be compared).
Timed region per call: tokenize the prompts -> generate -> images as a host numpy array.
- sdjax: `pipe(ids, params, key, latents=..., return_trajectory=False)` (jax.jit, one program).
  `--trajectory` also times the default return_trajectory=True.
- sdjax-cli: the same, in a process set up as the `sdjax` command sets itself up (`tune_cpu_compiler()`: XLA:CPU
  flags; sdjax/compilation.py), to measure what those flags do.
- diffusers PyTorch: `StableDiffusionPipeline(prompt=..., latents=..., output_type="np")` under no_grad.
- old Flax: diffusers 0.35.2 `FlaxStableDiffusionPipeline(..., jit=True)` (pmap over the one CPU device),
  from the venv at $SDJAX_BENCH_OLDFLAX_PYTHON (default .bench-venv-oldflax/bin/python; see bench/README.md).
  Note: its loop runs `num_inference_steps` UNet calls where diffusers PyTorch and sdjax run PNDM's
  num_inference_steps + 1 (PLMS repeats one timestep); the report gives the per-UNet-call ratio too.
Works unchanged on a GPU (jax picks the GPU; torch uses CUDA when available; `--device cpu` forces CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

PEERS = ("sdjax", "sdjax-cli", "torch", "oldflax")


def make_latents(folder, batch, size, seed=0):
    import numpy as np

    vae = json.loads((Path(folder) / "vae" / "config.json").read_text())
    f = 2 ** (len(vae["block_out_channels"]) - 1)
    return np.random.default_rng(seed).standard_normal((batch, vae["latent_channels"], size // f, size // f)
                                                       ).astype("float32")


def _sync_np(x):
    import numpy as np

    return np.asarray(x)


# ---------------------------------------------------------------- workers (one per subprocess)
def worker_sdjax(a, folder, latents, prompts):
    import jax
    import jax.numpy as jnp

    from sdjax.pipelines import FlaxStableDiffusionPipeline

    t = time.perf_counter()
    pipe, params = FlaxStableDiffusionPipeline.from_pretrained(folder, dtype=jnp.float32)
    params = jax.device_put(params)
    load_s = time.perf_counter() - t
    key = jax.random.PRNGKey(0)
    lat = jnp.asarray(latents)

    def call(traj=False):
        ids = pipe.prepare_inputs(prompts)
        out = pipe(ids, params, key, num_inference_steps=a.steps, guidance_scale=7.5, height=a.size, width=a.size,
                   latents=lat, return_trajectory=traj)
        if traj:
            jax.block_until_ready(out.trajectory)
        return _sync_np(out.images)

    res = dict(load_s=load_s, n_unet_calls=a.steps + 1)
    res.update(_time_calls(call, a))
    if a.trajectory:
        t = time.perf_counter()
        call(True)
        cold = time.perf_counter() - t
        warm = []
        for _ in range(a.runs):
            t = time.perf_counter()
            call(True)
            warm.append(time.perf_counter() - t)
        res["trajectory"] = dict(cold_s=cold, warm=common.stats(warm))
    return res


def worker_torch(a, folder, latents, prompts):
    import torch
    from diffusers import StableDiffusionPipeline

    dev = "cuda" if (a.device != "cpu" and torch.cuda.is_available()) else "cpu"
    t = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32, safety_checker=None,
                                                   requires_safety_checker=False).to(dev)
    pipe.set_progress_bar_config(disable=True)
    load_s = time.perf_counter() - t
    lat = torch.from_numpy(latents).to(dev)

    def call():
        with torch.inference_mode():
            out = pipe(prompt=prompts, num_inference_steps=a.steps, guidance_scale=7.5, height=a.size, width=a.size,
                       latents=lat, output_type="np")
        return out.images

    res = dict(load_s=load_s, torch_threads=torch.get_num_threads(), torch_device=dev,
               attn_processor=type(next(iter(pipe.unet.attn_processors.values()))).__name__)
    res.update(_time_calls(call, a))
    res["n_unet_calls"] = len(pipe.scheduler.timesteps)  # PNDM/PLMS: steps + 1
    return res


def worker_oldflax(a, folder, latents, prompts):
    import jax
    import jax.numpy as jnp
    from diffusers import FlaxStableDiffusionPipeline
    from flax.jax_utils import replicate
    from flax.training.common_utils import shard

    t = time.perf_counter()
    pipe, params = FlaxStableDiffusionPipeline.from_pretrained(folder, from_pt=True, dtype=jnp.float32, feature_extractor=None,
                                                               safety_checker=None)
    params = replicate(params)
    load_s = time.perf_counter() - t
    n_dev = jax.local_device_count()
    keys = jax.random.split(jax.random.PRNGKey(0), n_dev)
    lat = jnp.asarray(latents.reshape((n_dev, -1) + latents.shape[1:]))

    def call():
        ids = shard(pipe.prepare_inputs(prompts))
        out = pipe(ids, params, keys, num_inference_steps=a.steps, guidance_scale=7.5, height=a.size, width=a.size,
                   latents=lat, jit=True)
        return _sync_np(out.images).reshape((-1, a.size, a.size, 3))

    res = dict(load_s=load_s, n_unet_calls=a.steps)
    res.update(_time_calls(call, a))
    return res


def _time_calls(call, a):
    t = time.perf_counter()
    images = call()
    cold = time.perf_counter() - t
    warm = []
    for _ in range(a.runs):
        t = time.perf_counter()
        images = call()
        warm.append(time.perf_counter() - t)
    out_dir = Path(a.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    import numpy as np

    np.save(out_dir / f"{a.worker}.npy", np.asarray(images, np.float32))
    return dict(cold_s=cold, warm=common.stats(warm), peak_rss_mb=common.peak_rss_mb(),
                image_shape=list(np.shape(images)))


def worker_main(a):
    if a.device == "cpu":
        os.environ["JAX_PLATFORMS"] = "cpu"
    if a.worker == "sdjax-cli":
        from sdjax.compilation import tune_cpu_compiler

        tune_cpu_compiler()  # before JAX starts its CPU backend, as `sdjax` does
    folder = Path(a.folder)
    latents = make_latents(folder, a.batch, a.size)
    prompts = (common.PROMPTS * a.batch)[: a.batch]
    fn = {"sdjax": worker_sdjax, "sdjax-cli": worker_sdjax, "torch": worker_torch, "oldflax": worker_oldflax}[a.worker]
    res = fn(a, folder, latents, prompts)
    try:
        import jax

        res["jax_backend"] = jax.default_backend()
    except Exception:  # noqa: BLE001
        pass
    common.emit(res)


# ---------------------------------------------------------------- parent
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny", choices=["tiny", "sd15"])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--runs", type=int, default=5, help="warm runs per peer")
    ap.add_argument("--peers", default=",".join(PEERS))
    ap.add_argument("--device", default="auto", choices=["auto", "cpu"])
    ap.add_argument("--trajectory", action="store_true", help="sdjax: also time return_trajectory=True")
    ap.add_argument("--smoke", action="store_true", help="1 warm run, don't wait for a quiet machine")
    ap.add_argument("--no-wait", action="store_true")
    ap.add_argument("--max-wait", type=float, default=2400)
    ap.add_argument("--json", help="write the results here too")
    ap.add_argument("--worker", choices=PEERS, help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--out-dir", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker_main(a)
    if a.smoke:
        a.runs, a.no_wait = 1, True

    peers = [p for p in a.peers.split(",") if p]
    folders = {p: common.model_folder(a.config) for p in ("sdjax", "sdjax-cli", "torch")}
    if "oldflax" in peers:
        if not common.OLDFLAX_PYTHON.exists():
            print(f"[bench] no old-Flax venv at {common.OLDFLAX_PYTHON}; skipping that peer", file=sys.stderr)
            peers.remove("oldflax")
        else:
            folders["oldflax"] = common.oldflax_folder(a.config)
    out_dir = common.CACHE / f"images-{a.config}-{a.size}-{a.batch}"
    quiet = common.wait_quiet(max_wait_s=0 if a.no_wait else a.max_wait)
    info = common.machine_info()
    results = {}
    for peer in peers:
        py = str(common.OLDFLAX_PYTHON) if peer == "oldflax" else sys.executable
        cmd = [py, __file__, "--worker", peer, "--folder", str(folders[peer]), "--out-dir", str(out_dir),
               "--batch", str(a.batch), "--size", str(a.size), "--steps", str(a.steps), "--runs", str(a.runs),
               "--device", a.device] + (["--trajectory"] if a.trajectory and peer == "sdjax" else [])
        load_before = common.load_avg()[0]
        print(f"[bench] {peer}: {' '.join(cmd[1:])}", file=sys.stderr)
        r = common.run_child(cmd)
        r["load_1min_before"] = round(load_before, 2)
        r["load_1min_after"] = round(common.load_avg()[0], 2)
        results[peer] = r
        if "error" in r:
            print(f"[bench] {peer} FAILED: {r['error']}\n{r.get('stderr_tail', '')}", file=sys.stderr)
        else:
            print(f"[bench] {peer}: cold {common.fmt_s(r['cold_s'])}, warm median {common.fmt_s(r['warm']['median'])}"
                  f" (spread {r['warm']['spread']:.1%}, n={r['warm']['n']})", file=sys.stderr)

    # image agreement against diffusers PyTorch (same weights, latents, scheduler => same images up to float error)
    import numpy as np

    agree = {}
    if (out_dir / "torch.npy").exists():
        ref = np.load(out_dir / "torch.npy")
        for peer in peers:
            f = out_dir / f"{peer}.npy"
            if peer != "torch" and f.exists() and "error" not in results[peer]:
                agree[peer] = float(np.abs(np.load(f) - ref).max())
    summary = dict(config=a.config, batch=a.batch, size=a.size, steps=a.steps, runs=a.runs, machine=info,
                   quiet=quiet, command="python bench/sampling.py " + " ".join(sys.argv[1:]), results=results,
                   max_abs_image_diff_vs_torch=agree)
    ok = {p: r for p, r in results.items() if "error" not in r}
    ratios = {}
    for mine, peer in (("sdjax", "torch"), ("sdjax", "oldflax"), ("sdjax-cli", "torch"), ("sdjax-cli", "sdjax")):
        if mine in ok and peer in ok:
            s, o = ok[mine], ok[peer]
            ratios[f"{mine}/{peer}"] = dict(
                warm=s["warm"]["median"] / o["warm"]["median"], cold=s["cold_s"] / o["cold_s"],
                warm_per_unet_call=(s["warm"]["median"] / s["n_unet_calls"]) / (o["warm"]["median"] / o["n_unet_calls"]))
    summary["ratios"] = ratios
    print(report(summary))
    if a.json:
        Path(a.json).write_text(json.dumps(summary, indent=1))


def report(s) -> str:
    m = s["machine"]
    lines = [f"## sampling: {s['config']}, batch {s['batch']}, {s['size']}x{s['size']}, {s['steps']} PNDM steps, "
             f"guidance 7.5, fp32",
             f"{m['date']} | {m['cpu']} x{m['cores']} | jax {m['jax']} ({m['jax_backend']}), flax {m['flax']}, "
             f"diffusers {m['diffusers']}, torch {m['torch']} | load avg {s['quiet']['load_avg']}"
             f"{'' if s['quiet']['quiet'] else ' (NOT quiet: ' + str(len(s['quiet']['busy'])) + ' busy processes)'}",
             f"`{s['command']}`", "",
             "| peer | UNet calls | load (s) | cold: first call (s) | warm median (s) | warm min-max (s) | spread | "
             "peak RSS (MiB) | max abs image diff vs torch | load avg before/after |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for peer, r in s["results"].items():
        if "error" in r:
            lines.append(f"| {peer} | FAILED: {r['error'][:200]} |||||||||")
            continue
        w = r["warm"]
        lines.append(f"| {peer} | {r['n_unet_calls']} | {r['load_s']:.2f} | {r['cold_s']:.3f} | {w['median']:.3f} | "
                     f"{w['min']:.3f}-{w['max']:.3f} | {w['spread']:.1%} | {r['peak_rss_mb']:.0f} | "
                     f"{s['max_abs_image_diff_vs_torch'].get(peer, '-') if peer != 'torch' else 'ref'} | "
                     f"{r['load_1min_before']}/{r['load_1min_after']} |")
        if "trajectory" in r:
            t = r["trajectory"]
            lines.append(f"| sdjax return_trajectory=True | {r['n_unet_calls']} | | {t['cold_s']:.3f} | "
                         f"{t['warm']['median']:.3f} | {t['warm']['min']:.3f}-{t['warm']['max']:.3f} | "
                         f"{t['warm']['spread']:.1%} | | | |")
    lines.append("")
    for k, v in s["ratios"].items():
        lines.append(f"- {k}: warm {v['warm']:.2f}, cold {v['cold']:.2f}, warm per UNet call {v['warm_per_unet_call']:.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
