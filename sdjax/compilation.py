"""Process-wide compilation settings, each turned on only when asked: JAX's persistent compilation cache, and
XLA:CPU flags (the `sdjax` command sets them: `tune_cpu_compiler`).

    sdjax.enable_compile_cache("~/.cache/sdjax-xla")     # or: export JAX_COMPILATION_CACHE_DIR=...

A second process then loads the compiled programs instead of compiling them (BENCHMARKS.md). Importing
sdjax or loading a model never changes `jax.config`; this function (the CLI's `--compile-cache`) does.
"""

from __future__ import annotations

import os

import jax


def enable_compile_cache(cache_dir: str | os.PathLike) -> str:
    """Cache every compiled program in `cache_dir` (created if missing), however fast it compiled."""
    cache_dir = os.path.abspath(os.path.expanduser(os.fspath(cache_dir)))
    os.makedirs(cache_dir, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return cache_dir


# XLA:CPU flags the `sdjax` command sets (`tune_cpu_compiler`), measured on jaxlib 0.10 (BENCHMARKS.md, "Host memory,
# round 4"): flag -> why. XLA aborts the process on a flag it does not know, so they are set only for the jaxlib
# versions they were measured on (TUNED_JAXLIB).
CPU_XLA_FLAGS = {
    # schedule for memory, not for running independent ops at once: an SD-1.5 256x256 generation keeps 160 MiB of
    # temporaries instead of 224 MiB, at the same speed. (Not set: `xla_cpu_experimental_ynn_fusion_type=`, XLA's
    # own matmul kernels instead of YNNPACK's: 60 MiB less at that peak and 14-20% faster on the toy model and
    # SD-1.5 at 256x256, but 45% slower on the tiny test model at 64x64.)
    "xla_cpu_enable_concurrency_optimized_scheduler": "false",
}
TUNED_JAXLIB = ("0.10.",)


def tune_cpu_compiler() -> list[str]:
    """Add CPU_XLA_FLAGS to XLA_FLAGS: each unless XLA_FLAGS already names it (the user's setting wins), and only
    on a jaxlib they were measured on. Only programs compiled for CPU change; GPU/TPU programs do not. Must run
    before JAX starts its CPU backend (the `sdjax` command calls it first thing). Returns the flags it added."""
    import jaxlib

    if not jaxlib.__version__.startswith(TUNED_JAXLIB):
        return []
    flags = os.environ.get("XLA_FLAGS", "")
    added = [f"--{name}={value}" for name, value in CPU_XLA_FLAGS.items() if name not in flags]
    if added:
        os.environ["XLA_FLAGS"] = " ".join([flags, *added]).strip()
    return added
