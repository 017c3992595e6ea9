"""The one rule from integer seeds to random keys, shared by the CLI, trajectories and viz.

Sample i of a run with seed s starts from the noise of `jax.random.PRNGKey(s + i)`, so an image depends on
its own seed only, not on the batch it was generated in or on where an interrupted run resumed. The
sampler's own randomness (ancestral steps) for batch b comes from `loop_key(s, b)`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

LOOP_KEY_STRIDE = 1_000_003  # a prime: batch keys never coincide with the per-sample noise seeds


def sample_seeds(seed: int, indices) -> list[int]:
    """The seed of each sample (its index in the run added to the run's seed)."""
    return [int(seed) + int(i) for i in indices]


def initial_noise(seeds, shape) -> np.ndarray:
    """One standard normal tensor of `shape` per seed: [len(seeds), *shape] float32."""
    return np.stack([np.asarray(jax.random.normal(jax.random.PRNGKey(int(s)), tuple(shape), jnp.float32))
                     for s in seeds])


def loop_key(seed: int, batch_index: int = 0) -> jax.Array:
    """The key of the sampler's own randomness for batch `batch_index` of a run."""
    return jax.random.PRNGKey(int(seed) + LOOP_KEY_STRIDE * (int(batch_index) + 1))
