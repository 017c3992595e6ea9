"""Images and masks in, as the image-conditioned pipelines take them (diffusers' VaeImageProcessor conventions).

    images = to_float_images([pil, pil])   # [B, H, W, 3] float32 in [0, 1] (grayscale and RGBA become RGB)
    masks = to_masks([pil_mask], like=images)  # [B, H, W, 1] float32, binarized at 0.5 (white = repaint)
    load_image("photo.png")                 # PIL RGB; an unreadable file is an SdjaxError naming it

Pipelines take images as float arrays in [-1, 1], NCHW (`to_model_images`), like diffusers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import InputError, SdjaxError


def load_image(path, mode: str = "RGB"):
    """A PIL image from a file, converted to `mode` ("RGB", or "L" for masks)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise SdjaxError(f"image file not found: {path}" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        with Image.open(path) as im:
            im.load()
            return _convert(im, mode)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise SdjaxError(f"cannot read image {path}: {type(e).__name__}: {e}") from None


def _convert(im, mode: str):
    """PIL -> mode. Transparent pixels of RGBA/LA images go over white (as an image viewer shows them)."""
    from PIL import Image

    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, rgba)
    return im.convert(mode)


def _as_list(items, single_ndim: int):
    """A PIL image, a list of them or of arrays, or one array: [one of ndim <= single_ndim] or a batch (its rows)."""
    if hasattr(items, "getpixel"):
        return [items]
    if isinstance(items, (list, tuple)):
        return list(items)
    arr = np.asarray(items)
    if arr.ndim == 3 and single_ndim == 2 and arr.shape[-1] == 1:  # one mask [H, W, 1]
        return [arr]
    return [arr] if arr.ndim <= single_ndim else list(arr)


def to_float_images(images, name: str = "images") -> np.ndarray:
    """PIL images, or arrays [H, W, 3|4|1] / [B, H, W, C] (float in [0, 1] or uint8) -> [B, H, W, 3] float32 in
    [0, 1]. Grayscale is repeated to RGB; RGBA goes over white. All images must have one size."""
    out = []
    for k, im in enumerate(_as_list(images, 3)):
        if hasattr(im, "getpixel"):  # PIL
            arr = np.asarray(_convert(im, "RGB"), np.float32) / 255.0
        else:
            arr = np.asarray(im)
            if arr.ndim == 2:
                arr = arr[..., None]
            if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
                raise InputError(f"`{name}[{k}]` must be [H, W, 3] (or 1 or 4 channels), got shape {arr.shape}")
            arr = arr.astype(np.float32) / 255.0 if arr.dtype == np.uint8 else arr.astype(np.float32)
            if not np.all(np.isfinite(arr)) or arr.min() < 0 or arr.max() > 1:
                raise InputError(f"`{name}[{k}]` must hold values in [0, 1] (floats) or uint8")
            if arr.shape[-1] == 4:  # over white
                arr = arr[..., :3] * arr[..., 3:] + (1 - arr[..., 3:])
            elif arr.shape[-1] == 1:
                arr = np.repeat(arr, 3, axis=-1)
        out.append(arr)
    if not out:
        raise InputError(f"`{name}` is empty")
    shapes = {a.shape for a in out}
    if len(shapes) > 1:
        raise InputError(f"`{name}` have different sizes {sorted(s[:2] for s in shapes)}; give images of one size")
    return np.stack(out)


def to_masks(masks, like: np.ndarray, name: str = "masks") -> np.ndarray:
    """PIL masks or arrays [H, W] / [H, W, 1] / [B, H, W(, 1)] -> [B, H, W, 1] float32 in {0, 1}: white (>= 0.5)
    is the region to repaint, as diffusers binarizes. Must have the images' size; RGB(A) PIL masks become gray."""
    out = []
    for k, m in enumerate(_as_list(masks, 2)):
        if hasattr(m, "getpixel"):
            arr = np.asarray(_convert(m, "L"), np.float32)[..., None] / 255.0
        else:
            arr = np.asarray(m)
            if arr.ndim == 2:
                arr = arr[..., None]
            if arr.ndim != 3 or arr.shape[-1] != 1:
                raise InputError(f"`{name}[{k}]` must have one channel ([H, W] or [H, W, 1]), got shape {arr.shape}"
                                 " (an RGB mask as a PIL image is converted to gray)")
            arr = arr.astype(np.float32) / 255.0 if arr.dtype == np.uint8 else arr.astype(np.float32)
            if not np.all(np.isfinite(arr)):
                raise InputError(f"`{name}[{k}]` holds NaN or inf")
        if arr.shape[:2] != like.shape[1:3]:
            raise InputError(f"`{name}[{k}]` is {arr.shape[1]}x{arr.shape[0]} (WxH), the image "
                             f"{like.shape[2]}x{like.shape[1]}: a mask must have its image's size")
        out.append((arr >= 0.5).astype(np.float32))
    if len(out) == 1 and len(like) > 1:
        out = out * len(like)
    if len(out) != len(like):
        raise InputError(f"{len(out)} masks for {len(like)} images")
    return np.stack(out)


def to_model_images(images: np.ndarray) -> np.ndarray:
    """[B, H, W, 3] in [0, 1] -> NCHW float32 in [-1, 1] (what the VAE encodes)."""
    return (2.0 * images - 1.0).transpose(0, 3, 1, 2).astype(np.float32)


def to_model_masks(masks: np.ndarray) -> np.ndarray:
    """[B, H, W, 1] -> NCHW [B, 1, H, W]."""
    return masks.transpose(0, 3, 1, 2).astype(np.float32)
