"""3x3 convolutions at SD 1.5's UNet shapes: plain `lax.conv_general_dilated`, sdjax's conv, torch's conv2d.

    python bench/conv.py --batch 2 --runs 5

sdjax's conv (sdjax/models/resnet.py: conv_general_dilated) computes outputs of at most SMALL_CONV_PIXELS
pixels on CPU as one matmul over the 3x3 patches; everything else goes to XLA's convolution unchanged.
This table is the evidence for that rule: per shape, the three implementations' medians and sdjax's
agreement with torch.
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

# (spatial side, in channels, out channels, stride): SD 1.5's UNet at 128x128 (2..16) and 256x256 (4..32) images.
SHAPES = [(2, 1280, 1280, 1), (2, 2560, 1280, 1), (4, 1280, 1280, 2), (4, 1280, 1280, 1), (4, 2560, 1280, 1),
          (8, 1280, 1280, 1), (8, 2560, 1280, 1), (8, 640, 640, 1), (16, 1280, 1280, 1), (16, 640, 640, 1),
          (16, 320, 320, 1), (32, 320, 320, 1), (32, 640, 320, 1)]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--json")
    a = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax import lax

    from sdjax.models.resnet import SMALL_CONV_PIXELS, conv_general_dilated

    def timed(fn):
        fn()
        ts = []
        for _ in range(a.runs):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    quiet = common.wait_quiet(max_wait_s=600)
    rng = np.random.default_rng(0)
    rows = []
    for side, cin, cout, stride in SHAPES:
        x = rng.standard_normal((a.batch, side, side, cin)).astype(np.float32)
        k = (rng.standard_normal((3, 3, cin, cout)) / np.sqrt(9 * cin)).astype(np.float32)
        xj, kj = jnp.asarray(x), jnp.asarray(k)
        args = ((stride, stride), ((1, 1), (1, 1)))
        dn = ("NHWC", "HWIO", "NHWC")
        plain = jax.jit(lambda x, k: lax.conv_general_dilated(x, k, *args, dimension_numbers=dn))
        ours = jax.jit(lambda x, k: conv_general_dilated(x, k, *args, dimension_numbers=dn))
        row = dict(side=side, cin=cin, cout=cout, stride=stride,
                   out_pixels=((side + 2 - 3) // stride + 1) ** 2,
                   lax_s=timed(lambda: jax.block_until_ready(plain(xj, kj))),
                   sdjax_s=timed(lambda: jax.block_until_ready(ours(xj, kj))))
        row["sdjax_path"] = "matmul" if row["out_pixels"] <= SMALL_CONV_PIXELS else "xla conv"
        out = np.asarray(ours(xj, kj))
        if not a.no_torch:
            import torch

            xt, kt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(k).permute(3, 2, 0, 1).contiguous()

            def tconv():
                with torch.inference_mode():
                    return torch.nn.functional.conv2d(xt, kt, stride=stride, padding=1)

            row["torch_s"] = timed(tconv)
            ref = tconv().permute(0, 2, 3, 1).numpy()
            row["rel_err_vs_torch"] = float(np.abs(out - ref).max() / np.abs(ref).max())
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)

    info = common.machine_info()
    lines = [f"{info['date']} | {info['cpu']} x{info['cores']} | jax {info['jax']}, torch {info['torch']} | "
             f"load avg {quiet['load_avg']}", "",
             f"`python bench/conv.py --batch {a.batch} --runs {a.runs}` (fp32, NHWC, padding 1, medians)", "",
             "| input | stride | out pixels | lax.conv (ms) | sdjax (ms) | sdjax path | torch conv2d (ms) | "
             "sdjax / torch | rel err vs torch |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t = r.get("torch_s")
        lines.append(f"| {a.batch}x{r['side']}x{r['side']}x{r['cin']} -> {r['cout']} | {r['stride']} | {r['out_pixels']} | "
                     f"{r['lax_s'] * 1e3:.1f} | {r['sdjax_s'] * 1e3:.1f} | {r['sdjax_path']} | "
                     + (f"{t * 1e3:.1f} | {r['sdjax_s'] / t:.2f} | {r['rel_err_vs_torch']:.1e} |" if t else "- | - | - |"))
    print("\n".join(lines))
    if a.json:
        Path(a.json).write_text(json.dumps(dict(machine=info, quiet=quiet, rows=rows), indent=1))


if __name__ == "__main__":
    main()
