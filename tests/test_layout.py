"""The package's shape: one installed name, imports in one direction, no cycles."""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Source folder -> the package it installs as (pyproject's package-dir).
SOURCES = {"sdjax": ROOT / "sdjax", "sdjax.train": ROOT / "train", "sdjax.viz": ROOT / "viz",
           "sdjax.configs": ROOT / "configs"}
UPPER = ("sdjax.train", "sdjax.viz", "sdjax.cli", "sdjax.testing", "sdjax.configs")


def modules() -> dict[str, Path]:
    out = {}
    for package, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([package, *parts])
            if package == "sdjax" and parts and parts[0] in ("train", "viz", "configs"):
                continue
            out[name] = path
    return out


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Every module `name` imports, at module level or inside functions, resolved to full names."""
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[:len(base) - node.level + (1 if is_package else 0)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            for alias in node.names:  # `from pkg import submodule` imports that submodule
                sub = f"{mod}.{alias.name}"
                out.add(sub if sub in known else mod)
    return out


def layer(name: str) -> str:
    for upper in UPPER:
        if name == upper or name.startswith(upper + "."):
            return upper
    return "core" if name == "sdjax" or name.startswith("sdjax.") else "external"


def test_imports_go_one_way_and_never_to_tests_or_bench():
    mods = modules()
    known = set(mods)
    allowed = {  # what each layer may import besides itself and external libraries
        "core": {"core"},
        "sdjax.train": {"core"},
        "sdjax.viz": {"core"},
        "sdjax.testing": {"core"},
        "sdjax.configs": set(),
        "sdjax.cli": {"core", "sdjax.train", "sdjax.viz"},
    }
    bad = []
    for name, path in mods.items():
        for imp in imports_of(name, path, known):
            top = imp.split(".")[0]
            if top in ("tests", "bench", "train", "viz", "configs"):
                bad.append(f"{name} imports {imp}")
                continue
            target = layer(imp)
            if target in ("external",) or target == layer(name):
                continue
            if target not in allowed[layer(name)]:
                bad.append(f"{name} ({layer(name)}) imports {imp} ({target})")
    assert not bad, "imports against the layering:\n" + "\n".join(sorted(bad))


def test_no_import_cycles():
    mods = modules()
    known = set(mods)
    graph = {name: {i for i in imports_of(name, path, known) if i in known and i != name} for name, path in mods.items()}
    # importing a submodule imports its parent package first; that edge is not a cycle of ours
    state, stack, cycles = {}, [], []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in graph[n]:
            if state.get(m) == "open" and not n.startswith(m + "."):
                cycles.append(" -> ".join(stack[stack.index(m):] + [m]))
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = "done"

    for n in sorted(graph):
        if n not in state:
            visit(n)
    # a package's __init__ re-exporting its own submodules is not a cycle
    cycles = [c for c in cycles if not all(part.startswith(c.split(" -> ")[0]) for part in c.split(" -> "))]
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_module_level_caches_of_compiled_functions():
    """One compiled callable per entry point, built once; JAX's cache does the rest (no dicts of jitted functions)."""
    offenders = []
    for name, path in modules().items():
        text = path.read_text()
        for marker in ("_STEP_CACHE", "_COMPILED", "_compiled[", "id(mesh)", "WeakKeyDictionary"):
            if marker in text:
                offenders.append(f"{name}: {marker}")
    assert not offenders, offenders


@pytest.mark.slow
def test_wheel_installs_only_sdjax(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = tmp_path.glob("sdjax-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        top_level = [n for n in names if n.endswith("top_level.txt")]
        if top_level:  # setuptools writes it into the wheel's egg-info style metadata when present
            assert z.read(top_level[0]).decode().split() == ["sdjax"]
        record = z.read(next(n for n in names if n.endswith("RECORD"))).decode()
    tops = {line.split(",")[0].split("/")[0] for line in record.splitlines() if line}
    tops = {t for t in tops if not t.endswith(".dist-info")}
    assert tops == {"sdjax"}, tops
    for must in ("sdjax/train/ldm.py", "sdjax/viz/grid.py", "sdjax/configs/shapes_ldm.py", "sdjax/cli/__init__.py",
                 "sdjax/assets/toy-shapes/unet/diffusion_pytorch_model.safetensors"):
        assert must in names, must
