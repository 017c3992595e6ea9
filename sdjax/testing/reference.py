"""Helpers for comparing sdjax against the PyTorch reference (test-only; imports torch lazily)."""

import numpy as np


def rel_err(a, b) -> float:
    """max |a - b| / max |b|: the error relative to the output's scale."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def perturb_(torch_model, seed: int = 0, scale: float = 0.05):
    """Move every parameter away from its init (norm scales off 1, biases off 0) so that a wrong
    mapping cannot hide behind symmetric or constant initial values."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in torch_model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return torch_model


def torch_named_shapes(param_shapes, prefix: str = "") -> dict[str, tuple[int, ...]]:
    """A params tree (arrays or `jax.eval_shape` structs) -> {PyTorch key: PyTorch shape}, by the same rules
    `save_pretrained` writes with, without allocating anything: to compare a model's parameter names and
    shapes with a reference built on torch's meta device."""
    from ..convert import _rule_for_flax_leaf, flat_params, path_to_torch_key

    out = {}
    for path, leaf in flat_params(param_shapes).items():
        rule = _rule_for_flax_leaf(path[-1], len(leaf.shape))
        view = np.broadcast_to(np.zeros((), np.uint8), leaf.shape)  # no memory: the layout change is a view
        out[f"{prefix}{path_to_torch_key(path[:-1])}.{rule.torch_leaf}"] = tuple(rule.to_torch(view).shape)
    return out
