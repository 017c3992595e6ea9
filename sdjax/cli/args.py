"""Argument types for the commands: a bad value is refused by argparse, naming the option, before any work."""

from __future__ import annotations

import argparse
import math


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 0 <= value < 2**31:
        raise argparse.ArgumentTypeError(f"expected a seed in [0, 2**31), got {value}")
    return value


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_float(text: str) -> float:
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {value}")
    return value


def unit_interval(text: str) -> float:
    """A number in (0, 1] (img2img strength)."""
    value = finite_float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {value}")
    return value


def labels(text: str) -> dict[str, str]:
    """"color=red,shape=square" -> {"color": "red", "shape": "square"} (the heads and labels are checked against the
    classifier once it is loaded)."""
    out: dict[str, str] = {}
    for item in text.split(","):
        head, sep, label = (part.strip() for part in item.partition("="))
        if not sep or not head or not label:
            raise argparse.ArgumentTypeError(f"expected HEAD=LABEL[,HEAD=LABEL...] (e.g. color=red,shape=square), "
                                             f"got {text!r}")
        if head in out:
            raise argparse.ArgumentTypeError(f"head {head!r} is given twice in {text!r}")
        out[head] = label
    return out


def add_distributed_args(p: argparse.ArgumentParser) -> None:
    """Options of the commands that run over several processes (see sdjax.distributed)."""
    g = p.add_argument_group("several processes (TPU pod slices, several GPU hosts)")
    g.add_argument("--distributed", action="store_true",
                   help="join a multi-process run whose peers JAX finds itself (TPU pod slice, SLURM, Open MPI)")
    g.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address, the same for every process")
    g.add_argument("--num-processes", type=positive_int, help="how many processes take part")
    g.add_argument("--process-id", type=int, help="this process's index, 0 .. num-processes - 1")


def init_distributed(args) -> bool:
    from ..distributed import initialize

    return initialize(args.coordinator, args.num_processes, args.process_id, auto=args.distributed)
