"""What every pipeline returns: images, and the trajectory of the steps it ran."""

from __future__ import annotations

import flax
import jax
import numpy as np


@flax.struct.dataclass
class Trajectory:
    latents: jax.Array                # [T+1, B, C, h, w]: the sample before the first step run, then after each
    pred_original_samples: jax.Array  # [T, B, C, h, w]: x̂0 predicted at each step
    timesteps: jax.Array              # [T]
    noise_levels: jax.Array           # [T]: sigma (sigma-space schedulers) or sqrt(1 - alpha_bar_t)
    attention_maps: jax.Array | None = None  # [T, B, h, w, L]: cross-attention per token (when asked)

    def steps(self, start: int, axis: int = 0) -> "Trajectory":
        """The part from model call `start` on (the steps an image-to-image run actually ran); `axis` is the
        step axis (1 for a jit=True output, whose leading axis is the device)."""
        if start == 0:
            return self
        cut = lambda x: None if x is None else jax.lax.slice_in_dim(x, start, x.shape[axis], axis=axis)
        return self.replace(latents=cut(self.latents), pred_original_samples=cut(self.pred_original_samples),
                            timesteps=cut(self.timesteps), noise_levels=cut(self.noise_levels),
                            attention_maps=cut(self.attention_maps))


@flax.struct.dataclass
class FlaxStableDiffusionPipelineOutput:
    images: jax.Array                 # [B, H, W, 3] float32 in [0, 1]
    trajectory: Trajectory | None = None
    frames: np.ndarray | None = None  # [T, B, H, W, 3] uint8: decoded x̂0 (decode_trajectory=True)
