"""A JSONL metrics log (one object per logged step) and a loss-curve PNG drawn from it.

On resume the log is cut back to the restored step, so it reads as one uninterrupted run.
"""

from __future__ import annotations

import json
from pathlib import Path

from sdjax.io import atomic_write


class MetricsLog:
    def __init__(self, path, resume_step: int, write: bool | None = None):
        """write: whether this process writes the log (default: process 0 of a multi-process run, see
        train.parallel.is_primary); the others only read it."""
        from .parallel import is_primary

        self.path = Path(path)
        self.enabled = is_primary() if write is None else write
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a kill
                    continue
                if row.get("step", 0) <= resume_step:
                    kept.append(line)
        self.path.write_text("".join(l + "\n" for l in kept))

    def write(self, step: int, **metrics) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def rows(self) -> list[dict]:
        return [json.loads(l) for l in self.path.read_text().splitlines() if l.strip()]


def plot_losses(log_path, png_path, keys=("loss",), title: str = "") -> None:
    from matplotlib.figure import Figure  # not pyplot: no window, and a notebook's backend is left alone

    rows = [json.loads(l) for l in Path(log_path).read_text().splitlines() if l.strip()]
    fig = Figure(figsize=(4.5 * len(keys), 3.2))
    axes = fig.subplots(1, len(keys), squeeze=False)
    for ax, key in zip(axes[0], keys):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            ax.plot(*zip(*pts))
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        if key.endswith("loss") and pts and min(p[1] for p in pts) > 0:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write(png_path, lambda f: fig.savefig(f, format="png", dpi=100))
