"""Cost of `show_progress` (a host callback per step from inside the compiled scan) vs the same call without it.

Interleaved warm runs (off, on, off, on, ...) of one pipeline call, so that drift in the machine's load hits
both alike; the median of each. Both programs are compiled before timing.

    python bench/progress.py --config tiny --batch 2 --size 64 --steps 50 --runs 7
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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny", choices=["tiny", "sd15", "toy"])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--no-wait", action="store_true")
    ap.add_argument("--max-wait", type=float, default=2400)
    ap.add_argument("--json")
    a = ap.parse_args()

    import jax

    from sdjax.pipelines import FlaxStableDiffusionPipeline, engine

    if a.config == "toy":
        from sdjax.assets import toy_model_path

        folder = toy_model_path()
    else:
        folder = common.model_folder(a.config)
    quiet = {"quiet": None} if a.no_wait else common.wait_quiet(a.max_wait)
    pipe, params = FlaxStableDiffusionPipeline.from_pretrained(folder, scheduler="ddim")
    ids = pipe.prepare_inputs((common.PROMPTS * a.batch)[: a.batch])
    key = jax.random.PRNGKey(0)
    engine.show_progress.bar = staticmethod(lambda total, desc="": _Quiet())  # count, do not draw

    def call(on: bool) -> float:
        t = time.perf_counter()
        if on:
            with engine.show_progress():
                jax.block_until_ready(pipe(ids, params, key, num_inference_steps=a.steps, height=a.size,
                                           width=a.size).images)
        else:
            jax.block_until_ready(pipe(ids, params, key, num_inference_steps=a.steps, height=a.size,
                                       width=a.size).images)
        return time.perf_counter() - t

    call(False), call(True)  # compile both
    times = {False: [], True: []}
    for _ in range(a.runs):
        for on in (False, True):
            times[on].append(call(on))
    off, on = statistics.median(times[False]), statistics.median(times[True])
    s = dict(machine=common.machine_info(), quiet=quiet, config=a.config, batch=a.batch, size=a.size, steps=a.steps,
             runs=a.runs, off_s=off, on_s=on, overhead=on / off - 1, times={"off": times[False], "on": times[True]},
             command="python bench/progress.py " + " ".join(sys.argv[1:]))
    m = s["machine"]
    print(f"### progress bar cost: {a.config}, batch {a.batch}, {a.size}x{a.size}, {a.steps} DDIM steps\n"
          f"{m['date']} | {m['cpu']} x{m['cores']} | jax {m['jax']} | load avg {common.load_avg()}\n"
          f"`{s['command']}`\n\n| | warm median (s) | min-max (s) |\n|---|---|---|\n"
          f"| without | {off:.3f} | {min(times[False]):.3f}-{max(times[False]):.3f} |\n"
          f"| show_progress | {on:.3f} | {min(times[True]):.3f}-{max(times[True]):.3f} |\n\n"
          f"overhead: {100 * s['overhead']:+.1f}% ({a.steps} callbacks)")
    if a.json:
        Path(a.json).write_text(json.dumps(s, indent=2))


class _Quiet:
    n = 0

    def update(self, k):
        self.n += k

    def close(self):
        pass


if __name__ == "__main__":
    main()
