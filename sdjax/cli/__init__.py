"""The `sdjax` command: generate, img2img, inpaint, merge, upscale, trajectories, viz, demo, train.

The CLI is the top layer: it composes the core (sdjax.pipelines, sdjax.trajectories), sdjax.viz and
sdjax.train; nothing below imports it. `run_command` is the one error boundary of every command.

    sdjax generate --prompt "a red circle on a white background" --out out/
    sdjax train ldm --config shapes_ldm --workdir runs/shapes_ldm
"""

from __future__ import annotations

import argparse
import os
import sys

from ..compilation import tune_cpu_compiler
from ..errors import SdjaxError
from ..io import limit_host_heap
from . import edit, generate, train, viz


class Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line (`sdjax generate: error: argument --steps: ...`) and exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="sdjax", description="Stable Diffusion in JAX/Flax.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    generate.add_commands(sub)
    edit.add_commands(sub)
    viz.add_commands(sub)
    train.add_commands(sub)
    return parser


def run_command(command, prog: str) -> int:
    """Run `command()` for a command-line program: 0 when it returns. User errors print one line,
    `prog: error: ...`, and exit with 2: sdjax's own errors (bad arguments, files, configs, weights) and OS
    errors on a path (a folder that cannot be written, a file that cannot be read). Ctrl-C prints
    `prog: interrupted` (130). Anything else is a bug in sdjax and keeps its traceback."""
    try:
        command()
    except SdjaxError as e:
        print(f"{prog}: error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.filename is None:
            raise
        print(f"{prog}: error: {e.filename}: {e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 0


def _one_line(message: str) -> str:
    """The first line, and how many more there are (a weights mismatch lists its tensors over many lines)."""
    lines = message.strip().splitlines() or [""]
    if len(lines) == 1:
        return lines[0]
    return f"{lines[0]} " + "; ".join(line.strip() for line in lines[1:6]) + (" ..." if len(lines) > 6 else "")


def quiet_libraries() -> None:
    """transformers prints advice about PyTorch/TensorFlow being absent when it is imported; sdjax uses only its
    tokenizers, so the CLI silences that (an application's choice; importing sdjax itself changes nothing)."""
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def entry() -> None:
    """The `sdjax` program (console script and `python -m sdjax.cli`): one command per process, so it may tune the
    process's allocator (`limit_host_heap`) and XLA:CPU's flags (`tune_cpu_compiler`); `main` itself, which tests
    and other programs call in-process, does not."""
    limit_host_heap()
    tune_cpu_compiler()
    sys.exit(main())


def main(argv=None) -> int:
    quiet_libraries()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a one-line argument error (2)
        return e.code if isinstance(e.code, int) else 2
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    prog = " ".join(["sdjax", *args.command_path]) if hasattr(args, "command_path") else f"sdjax {args.command}"
    return run_command(lambda: _with_progress(args.func, args), prog)


def _with_progress(func, args) -> None:
    """Every pipeline call a command makes shows a progress bar that moves with the compiled loop."""
    from ..pipelines.engine import show_progress

    with show_progress():
        func(args)
