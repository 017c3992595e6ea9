import importlib.util
import os
import shutil
import tempfile

# 8 host CPU devices for the pmap / sharding tests; must be set before jax is imported.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The XLA:CPU flags the `sdjax` command sets (sdjax.compilation.tune_cpu_compiler), here too, before JAX starts its
# CPU backend: in-process runs then compute the same bits as the `sdjax ...` subprocesses (and notebook kernels) the
# tests start, which inherit this environment; the resume tests compare the two.
from sdjax.compilation import tune_cpu_compiler  # noqa: E402

tune_cpu_compiler()

# One JAX persistent compilation cache for the whole run: the test processes (pytest-xdist's workers inherit this
# environment) and every command, kernel and multi-process run they start. Many tests compile the same programs
# (the tiny pipelines at the same shapes, each `sdjax ...` subprocess, each restarted training process); with the
# cache only the first compiles, the others load it. JAX keeps what took >= 1 s to compile. Results do not change:
# a loaded program is the compiled one. Tests that count compiles read the in-memory jit caches, not this.
# A cache the user set is used as it is; the one made here is removed at the end.
_OWN_COMPILE_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _OWN_COMPILE_CACHE = tempfile.mkdtemp(prefix="sdjax-tests-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_COMPILE_CACHE

import pytest

HAVE_REFERENCE = all(importlib.util.find_spec(m) is not None for m in ("torch", "diffusers", "transformers"))
NO_REFERENCE = ("the PyTorch reference (torch, diffusers, transformers) is not installed: "
                "pip install torch==2.13.0 && pip install -e '.[test]'")


def pytest_configure(config):
    config.addinivalue_line("markers", "parity: compares sdjax with diffusers/transformers PyTorch (needs torch)")
    config.addinivalue_line("markers", "slow: takes more than ~20 s on 2 CPU cores (trains, or runs a subprocess)")


def pytest_unconfigure(config):
    if _OWN_COMPILE_CACHE and not hasattr(config, "workerinput"):  # made by this process, not an xdist worker
        shutil.rmtree(_OWN_COMPILE_CACHE, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    if HAVE_REFERENCE:
        return
    skip = pytest.mark.skip(reason=NO_REFERENCE)
    for item in items:
        if "parity" in item.keywords:
            item.add_marker(skip)


_MAPS = "/proc/self/maps"
_MAX_MAPS = 30_000  # Linux refuses new mappings past vm.max_map_count (65530 by default)


@pytest.fixture(autouse=True)
def _release_compiled_programs():
    """Drop JAX's compiled programs once the process holds many memory mappings.

    Every XLA:CPU executable keeps about three mappings (code, read-only data, data) while JAX's caches hold it.
    The whole suite compiles some 20,000 programs in one process; past vm.max_map_count, mmap fails inside
    LLVM and the next compile segfaults (exit 139 at ~73% of the suite). Tests do not depend on what is cached."""
    yield
    if os.path.exists(_MAPS):
        with open(_MAPS, "rb") as f:
            n = sum(1 for _ in f)
        if n > _MAX_MAPS:
            import gc

            import jax

            jax.clear_caches()
            gc.collect()


@pytest.fixture(autouse=True, scope="session")
def _torch_threads():
    if not HAVE_REFERENCE:
        return
    import torch

    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """A small random Stable Diffusion folder saved by diffusers (built once per test session)."""
    if not HAVE_REFERENCE:
        pytest.skip(NO_REFERENCE)
    from sdjax.testing import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_folder):
    """(pipeline, params) of `tiny_folder`, loaded once per test session."""
    from sdjax.pipelines import FlaxStableDiffusionPipeline

    return FlaxStableDiffusionPipeline.from_pretrained(tiny_folder)
