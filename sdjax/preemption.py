"""Stopping cleanly on SIGTERM (a TPU/GPU preemption notice, `kill`, a scheduler's stop).

    with stop_requested() as stop:
        for item in work:
            if stop:             # after SIGTERM: the current item was finished, nothing is half-written
                break
            do(item)

The handler only sets a flag; the loop decides where to stop (between shards, between training steps),
saves, and the command exits 0. A rerun resumes. Outside the main thread (where Python cannot install a
signal handler) the flag is never set and SIGTERM keeps its default meaning.
"""

from __future__ import annotations

import contextlib
import signal
import threading


class StopFlag:
    def __init__(self):
        self.signal: int | None = None

    def __bool__(self) -> bool:
        return self.signal is not None

    def set(self, signum: int = signal.SIGTERM) -> None:
        self.signal = signum


@contextlib.contextmanager
def stop_requested(signals=(signal.SIGTERM,)):
    """A StopFlag that becomes true when one of `signals` arrives while the block runs."""
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = {s: signal.signal(s, lambda signum, frame: flag.set(signum)) for s in signals}
    try:
        yield flag
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def any_process(flag: bool) -> bool:
    """True if `flag` is true in any process of a multi-process JAX run (a collective: every process must call
    it at the same point); the flag itself in a single process."""
    import jax

    if jax.process_count() == 1:
        return bool(flag)
    import numpy as np
    from jax.experimental import multihost_utils

    return bool(np.asarray(multihost_utils.process_allgather(np.asarray([bool(flag)]))).any())
