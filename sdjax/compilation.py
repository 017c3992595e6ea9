"""JAX's persistent compilation cache, turned on only when asked (it is a process-wide setting).

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
