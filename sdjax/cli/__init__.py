"""The `sdjax` command: generate, trajectories, viz, demo, train.

The CLI is the top layer: it composes the core (sdjax.pipelines, sdjax.trajectories), sdjax.viz and
sdjax.train; nothing below imports it. `run_command` is the one error boundary of every command.

    sdjax generate --prompt "a red circle on a white background" --out out/
    sdjax train ldm --config shapes_ldm --workdir runs/shapes_ldm
"""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import SdjaxError
from . import generate, train, viz


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdjax", description="Stable Diffusion in JAX/Flax.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    generate.add_commands(sub)
    viz.add_commands(sub)
    train.add_commands(sub)
    return parser


def run_command(command, prog: str) -> int:
    """Run `command()` for a command-line program: 0 when it returns; an SdjaxError is printed as one line,
    `prog: error: ...` (exit code 2), and Ctrl-C as `prog: interrupted` (130). Anything else is a bug in sdjax
    and keeps its traceback."""
    try:
        command()
    except SdjaxError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 0


def quiet_libraries() -> None:
    """transformers prints advice about PyTorch/TensorFlow being absent when it is imported; sdjax uses only its
    tokenizers, so the CLI silences that (an application's choice; importing sdjax itself changes nothing)."""
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def main(argv=None) -> int:
    quiet_libraries()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    prog = " ".join(["sdjax", *args.command_path]) if hasattr(args, "command_path") else f"sdjax {args.command}"
    return run_command(lambda: args.func(args), prog)
