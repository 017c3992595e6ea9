"""Shared checks of the bad-input test modules: one line naming the argument, exit code 2, no traceback,
nothing outside the command's own output changed."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from sdjax.cli import main


def snapshot(root: Path, exclude: Path | None = None) -> dict:
    """Every file under `root` (but `exclude`) with its size and content hash, and every folder."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        if exclude is not None and (d == exclude or exclude in d.parents):
            dirnames[:] = []
            continue
        out[str(d)] = "dir"
        for name in filenames:
            p = d / name
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "special"
    return out


def error_line(stderr: str, prog: str) -> str:
    """The error line (the last one) of a failed command; earlier lines may only be progress notes."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert lines, "no error message"
    last = lines[-1]
    assert last.startswith(f"{prog}: error: "), stderr[-3000:]
    assert sum("error:" in ln for ln in lines) == 1, stderr[-3000:]
    return last


def run_cli(capsys, argv, root: Path, expect: str, out: Path | None = None, prog: str | None = None) -> str:
    """Run `sdjax argv` in this process; assert exit 2, one error line containing `expect`, and that nothing under
    `root` outside `out` changed. Returns the error line."""
    before = snapshot(root, out)
    capsys.readouterr()
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, (argv, err[-3000:])
    prog = prog or "sdjax " + " ".join(str(a) for a in argv[:2 if argv[0] == "train" else 1])
    line = error_line(err, prog)
    assert expect in line, (argv, line)
    assert snapshot(root, out) == before, f"{argv} changed files outside its output"
    return line


def run_cli_process(argv, env_extra=None, timeout=300):
    env = dict(os.environ, XLA_FLAGS="", PYTHONUNBUFFERED="1", **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "sdjax.cli", *map(str, argv)], capture_output=True, text=True,
                          env=env, timeout=timeout)
