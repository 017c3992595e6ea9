"""Where the time goes: one UNet call (the denoising loop's body), sdjax vs diffusers PyTorch, same weights/shapes.

    python bench/unet.py --config sd15 --batch 2 --size 256 --runs 5
    python bench/unet.py --config tiny --batch 4 --size 64 --attention fused,einsum,einsum_heads_major

--batch is the UNet batch (2 x the prompt batch under classifier-free guidance), --size the image size.
Times `jax.jit(unet.apply)` for each attention implementation in --attention (monkeypatched into
sdjax.models.attention for this process only) against `torch_unet(x, t, ctx)` under inference_mode,
interleaved run by run, and the attention op alone at the UNet's largest self-attention shape.
  fused               jax.nn.dot_product_attention (XLA's implementation on CPU)
  einsum              scores = einsum('bqnh,bknh->bnqk'), softmax, einsum back (sdjax's probs path)
  einsum_heads_major  q/k/v transposed to [B, N, T, H] first, so both dots have leading batch dims
  default             whatever sdjax.models.attention.dot_product_attention does (the shipped choice)
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


def attention_impls():
    import jax
    import jax.numpy as jnp

    def fused(q, k, v, scale):
        return jax.nn.dot_product_attention(q, k, v, scale=scale)

    def einsum(q, k, v, scale):
        s = jnp.einsum("bqnh,bknh->bnqk", q, k).astype(jnp.float32) * scale
        return jnp.einsum("bnqk,bknh->bqnh", jax.nn.softmax(s, axis=-1).astype(v.dtype), v)

    def einsum_heads_major(q, k, v, scale):
        q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
        s = jnp.einsum("bnqh,bnkh->bnqk", q, k).astype(jnp.float32) * scale
        o = jnp.einsum("bnqk,bnkh->bnqh", jax.nn.softmax(s, axis=-1).astype(v.dtype), v)
        return o.transpose(0, 2, 1, 3)

    return dict(fused=fused, einsum=einsum, einsum_heads_major=einsum_heads_major)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="sd15", choices=["tiny", "sd15"])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--attention", default="default,fused,einsum_heads_major")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--no-wait", action="store_true")
    ap.add_argument("--max-wait", type=float, default=2400)
    ap.add_argument("--json")
    a = ap.parse_args()
    folder = common.model_folder(a.config)

    import jax
    import jax.numpy as jnp
    import numpy as np

    import sdjax.models.attention as attn_mod
    from sdjax.models.unet_2d_condition import UNet2DConditionModel

    unet, params = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    ucfg = json.loads((folder / "unet" / "config.json").read_text())
    vae_cfg = json.loads((folder / "vae" / "config.json").read_text())
    f = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((a.batch, 4, a.size // f, a.size // f)).astype("float32")
    ctx = rng.standard_normal((a.batch, 77, ucfg["cross_attention_dim"])).astype("float32")
    t = np.full((a.batch,), 500, np.int32)

    shipped = attn_mod.dot_product_attention
    impls = attention_impls()
    fns = {}
    for name in a.attention.split(","):
        if name == "default":
            attn_mod.dot_product_attention = shipped
        else:
            impl = impls[name]

            def patched(q, k, v, *, mask=None, is_causal=False, scale=None, upcast=False, return_probs=False,
                        _impl=impl):
                assert mask is None and not is_causal and not return_probs
                return _impl(q, k, v, q.shape[-1] ** -0.5 if scale is None else scale).astype(q.dtype)

            attn_mod.dot_product_attention = patched
        fn = jax.jit(lambda p, x, t, c: unet.apply({"params": p}, x, t, c))
        tc = time.perf_counter()
        compiled = fn.lower(params, x, t, ctx).compile()  # trace now, with this implementation patched in
        fns[name] = (compiled, time.perf_counter() - tc)
    attn_mod.dot_product_attention = shipped

    runners = {f"sdjax ({n})": (lambda c=c: jax.block_until_ready(c(params, x, t, ctx))) for n, (c, _) in fns.items()}
    outs = {n: np.asarray(r()) for n, r in runners.items()}
    if not a.no_torch:
        import torch
        from diffusers import UNet2DConditionModel as TorchUNet

        tu = TorchUNet.from_pretrained(folder, subfolder="unet").eval()
        xt, ct, tt = torch.from_numpy(x), torch.from_numpy(ctx), torch.from_numpy(t).long()

        def torch_call():
            with torch.inference_mode():
                return tu(xt, tt, ct).sample

        runners["diffusers torch (SDPA)"] = torch_call
        outs["diffusers torch (SDPA)"] = torch_call().numpy()

    quiet = common.wait_quiet(max_wait_s=0 if a.no_wait else a.max_wait)
    times = {n: [] for n in runners}
    for _ in range(a.runs):
        for n, r in runners.items():
            tt0 = time.perf_counter()
            r()
            times[n].append(time.perf_counter() - tt0)

    # the attention op alone, at the largest self-attention of this UNet
    heads = ucfg["attention_head_dim"]
    heads = heads[0] if isinstance(heads, (list, tuple)) else heads
    c0 = ucfg["block_out_channels"][0]
    L = (a.size // f) ** 2
    q = jnp.asarray(rng.standard_normal((a.batch, L, heads, c0 // heads)), jnp.float32)
    op_times = {}
    for name, impl in impls.items():
        g = jax.jit(lambda q, k, v, _i=impl: _i(q, k, v, q.shape[-1] ** -0.5))
        jax.block_until_ready(g(q, q, q))
        ts = []
        for _ in range(a.runs):
            tt0 = time.perf_counter()
            jax.block_until_ready(g(q, q, q))
            ts.append(time.perf_counter() - tt0)
        op_times[name] = statistics.median(ts)

    ref = outs.get("diffusers torch (SDPA)")
    s = dict(config=a.config, batch=a.batch, size=a.size, machine=common.machine_info(), quiet=quiet,
             load_avg_end=[round(v, 2) for v in common.load_avg()],
             command="python bench/unet.py " + " ".join(sys.argv[1:]),
             unet={n: dict(time=common.stats(v), max_abs_diff_vs_torch=None if ref is None else
                           float(np.abs(outs[n] - ref).max())) for n, v in times.items()},
             compile_s={n: c for n, (_, c) in fns.items()},
             attention_op=dict(shape=[a.batch, L, heads, c0 // heads], times=op_times))
    m = s["machine"]
    lines = [f"## one UNet call: {a.config}, UNet batch {a.batch}, {a.size}x{a.size} image ({a.size // f}x{a.size // f} latent), fp32",
             f"{m['date']} | {m['cpu']} x{m['cores']} | jax {m['jax']}, torch {m['torch']}, diffusers {m['diffusers']} | "
             f"load avg {quiet['load_avg']}{'' if quiet['quiet'] else ' (NOT quiet)'}, end {s['load_avg_end']}",
             f"`{s['command']}`", "", "| implementation | median (s) | min-max (s) | vs torch | max abs diff vs torch |",
             "|---|---|---|---|---|"]
    tref = statistics.median(times["diffusers torch (SDPA)"]) if ref is not None else None
    for n, r in s["unet"].items():
        tm, d = r["time"], r["max_abs_diff_vs_torch"]
        rel = "-" if tref is None else f"{tm['median'] / tref:.2f}"
        lines.append(f"| {n} | {tm['median']:.3f} | {tm['min']:.3f}-{tm['max']:.3f} | {rel} | "
                     f"{'-' if d is None else f'{d:.1e}'} |")
    lines += ["", f"Attention op alone at {s['attention_op']['shape']} (B, T, N, H), self-attention: " +
              ", ".join(f"{n} {v * 1000:.1f} ms" for n, v in op_times.items())]
    print("\n".join(lines))
    if a.json:
        Path(a.json).write_text(json.dumps(s, indent=1))


if __name__ == "__main__":
    main()
