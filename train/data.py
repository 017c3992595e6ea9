"""Captioned image datasets, as uint8 arrays in memory.

    ds = load_dataset("shapes", n=20000, image_size=32, seed=0)   # built in, generated, no download
    ds = load_dataset("folder:/path/to/images", n=None, image_size=64)  # PNG/JPEG + optional same-name .txt
    ds = load_dataset("hf:user/name", ...)                         # Hugging Face `datasets` (online only)
    ds.images  # [N, H, W, 3] uint8;  ds.captions  # list[str];  ds.labels  # [N, 3] (shapes only)

"shapes": one circle, square or triangle in one of six colors on a white, black or gray background,
random size and position; caption "a {color} {shape} on a {background} background". Image i depends
only on (seed, i), so the first n images are the same whatever n is.
"shapes-anycolor": the same images, but half of the shapes (drawn from (seed, i) too) in a uniform random RGB
colour: data for an autoencoder that must carry colours the text-to-image model never names (a LoRA's new colour).

Batches are derived from (seed, step) (`batch_indices`), so a resumed run sees the same data order.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from pathlib import Path

import numpy as np

from sdjax.errors import SdjaxError

logger = logging.getLogger(__name__)

COLORS = {"red": (1.0, 0.0, 0.0), "green": (0.0, 0.8, 0.0), "blue": (0.0, 0.0, 1.0),
          "yellow": (1.0, 1.0, 0.0), "magenta": (1.0, 0.0, 1.0), "cyan": (0.0, 1.0, 1.0)}
SHAPES = ("circle", "square", "triangle")
NEW_SHAPES = ("star",)  # never drawn in "shapes": concept_dataset draws them
ALL_SHAPES = SHAPES + NEW_SHAPES  # shape label i is ALL_SHAPES[i]
NEW_COLORS = {"orange": (1.0, 0.5, 0.0)}  # never drawn in "shapes" either
ALL_COLORS = {**COLORS, **NEW_COLORS}  # colour label i is ALL_COLOR_NAMES[i]
STAR_INNER = 0.5  # a star's inner radius / outer radius (a regular pentagram's is 0.38: thicker reads better at 32 px)
BACKGROUNDS = {"white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0), "gray": (0.5, 0.5, 0.5)}
COLOR_NAMES = tuple(COLORS)
ALL_COLOR_NAMES = tuple(ALL_COLORS)
CONCEPTS = NEW_SHAPES + tuple(NEW_COLORS)  # what a LoRA can teach the toy model (train/lora.py)
BACKGROUND_NAMES = tuple(BACKGROUNDS)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
HELD_OUT_START = 10_000_000  # shapes indices used for evaluation (never in a training set)
SUPERSAMPLE = 4  # render at 4x and average: anti-aliased edges


class DataError(SdjaxError):
    """A dataset that cannot be read (empty folder, no readable image, unknown name)."""


@dataclasses.dataclass
class ImageDataset:
    images: np.ndarray             # [N, H, W, 3] uint8
    captions: list[str]
    labels: np.ndarray | None = None  # shapes: [N, 3] (color, shape, background) indices
    skipped: int = 0               # unreadable files skipped (image folders)

    def __len__(self):
        return len(self.images)


def caption_for(color: int, shape: int, background: int) -> str:
    name = ALL_COLOR_NAMES[color]
    article = "an" if name[0] in "aeiou" else "a"  # "an orange circle"; every old colour takes "a"
    return f"{article} {name} {ALL_SHAPES[shape]} on a {BACKGROUND_NAMES[background]} background"


def all_shape_captions() -> list[tuple[tuple[int, int, int], str]]:
    return [((c, s, b), caption_for(c, s, b)) for c in range(len(COLORS)) for s in range(len(SHAPES))
            for b in range(len(BACKGROUNDS))]


def _shape_mask(shape: int, center, radius: float, image_size: int) -> np.ndarray:
    """The shape's coverage on the SUPERSAMPLE x finer grid: bool [H * S, W * S]."""
    n = image_size * SUPERSAMPLE
    coords = (np.arange(n) + 0.5) / SUPERSAMPLE
    x, y = np.meshgrid(coords, coords)
    dx, dy = x - center[0], y - center[1]
    name = ALL_SHAPES[shape]
    if name == "circle":
        return dx * dx + dy * dy <= radius * radius
    if name == "square":
        half = radius / np.sqrt(2.0)
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if name == "triangle":  # upright equilateral triangle inscribed in the circle
        return (dy <= radius / 2) & (np.sqrt(3.0) * dx - dy <= radius) & (-np.sqrt(3.0) * dx - dy <= radius)
    return _star_mask(dx, dy, radius, radius * STAR_INNER)  # "star": upright five-pointed, its points on the circle


def _star_mask(dx, dy, outer: float, inner: float):
    """Inside an upright five-pointed star: in polar coordinates folded onto one half-point (|phi| <= pi/5), the
    point lies on the centre's side of the edge from the outer vertex (outer, 0) to the inner one (inner, pi/5)."""
    theta = np.arctan2(dx, -dy)  # 0 points up
    sector = 2 * np.pi / 5
    phi = np.abs(np.mod(theta + sector / 2, sector) - sector / 2)
    rho = np.hypot(dx, dy)
    px, py = rho * np.cos(phi), rho * np.sin(phi)
    ax, ay = outer, 0.0
    bx, by = inner * np.cos(sector / 2), inner * np.sin(sector / 2)
    # cross((B - A), (P - A)) >= 0 on the centre's side (the centre gives (bx - ax) * 0 - by * (0 - ax) > 0)
    return (bx - ax) * (py - ay) - (by - ay) * (px - ax) >= 0


def render_shape(color, shape: int, background: int, center, radius: float, image_size: int) -> np.ndarray:
    """One image [H, W, 3] uint8. `center` (x, y) and `radius` in pixels; the shape fits in the circle of that radius.
    color: an ALL_COLOR_NAMES index, or an RGB triple in [0, 1]."""
    mask = _shape_mask(shape, center, radius, image_size)
    fg = np.array(ALL_COLORS[ALL_COLOR_NAMES[color]] if np.ndim(color) == 0 else color, np.float64)
    bg = np.array(BACKGROUNDS[BACKGROUND_NAMES[background]])
    img = np.where(mask[..., None], fg, bg)
    img = img.reshape(image_size, SUPERSAMPLE, image_size, SUPERSAMPLE, 3).mean(axis=(1, 3))
    return np.round(img * 255).astype(np.uint8)


def render_silhouette(shape: int, center, radius: float, image_size: int) -> np.ndarray:
    """The shape's silhouette [H, W] uint8: 255 inside, 0 outside, anti-aliased edges as `render_shape` draws them
    (a ControlNet's control image: white shape on black, at the shape's position and size)."""
    mask = _shape_mask(shape, center, radius, image_size).astype(np.float64)
    cover = mask.reshape(image_size, SUPERSAMPLE, image_size, SUPERSAMPLE).mean(axis=(1, 3))
    return np.round(cover * 255).astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class ShapeGeometry:
    """What shapes image (seed, index) shows: label indices, center (x, y) and radius in pixels."""

    color: int
    shape: int
    background: int
    center: tuple[float, float]
    radius: float

    @property
    def labels(self) -> tuple[int, int, int]:
        return self.color, self.shape, self.background


def shape_geometry(seed: int, index: int, image_size: int = 32) -> ShapeGeometry:
    """The labels, position and size of shapes image `index`: a function of (seed, index) only."""
    rng = np.random.default_rng([seed, index])
    color, shape, background = int(rng.integers(len(COLORS))), int(rng.integers(len(SHAPES))), int(rng.integers(len(BACKGROUNDS)))
    radius = rng.uniform(0.2, 0.42) * image_size
    cx, cy = rng.uniform(radius, image_size - radius, size=2)
    return ShapeGeometry(color, shape, background, (float(cx), float(cy)), float(radius))


def shapes_example(seed: int, index: int, image_size: int = 32, shape: int | None = None,
                   color: int | None = None):
    """(image, (color, shape, background)) of shapes image `index`: a function of (seed, index) only.

    shape / color: draw this shape (an ALL_SHAPES index) or colour (an ALL_COLOR_NAMES index) instead of the drawn
    one; everything else is that of the same (seed, index) (`concept_dataset`)."""
    g = shape_geometry(seed, index, image_size)
    if shape is not None:
        g = dataclasses.replace(g, shape=int(shape))
    if color is not None:
        g = dataclasses.replace(g, color=int(color))
    return render_shape(g.color, g.shape, g.background, g.center, g.radius, image_size), g.labels


ANYCOLOR_SHARE = 0.5  # "shapes-anycolor": the share of shapes drawn in a random RGB colour


def shapes_anycolor_example(seed: int, index: int, image_size: int = 32):
    """(image, caption) of "shapes-anycolor" image `index`: shapes image `index`, its shape in a uniform random RGB
    colour with probability ANYCOLOR_SHARE (from its own stream of (seed, index)), captioned with the colour's hex."""
    g = shape_geometry(seed, index, image_size)
    rng = np.random.default_rng([seed, index, 1])  # [seed, index] is the geometry's stream
    if rng.random() >= ANYCOLOR_SHARE:
        return render_shape(g.color, g.shape, g.background, g.center, g.radius, image_size), caption_for(*g.labels)
    rgb = rng.random(3)
    image = render_shape(rgb, g.shape, g.background, g.center, g.radius, image_size)
    hex_color = "#" + "".join(f"{round(255 * v):02x}" for v in rgb)
    return image, f"a {hex_color} {ALL_SHAPES[g.shape]} on a {BACKGROUND_NAMES[g.background]} background"


@functools.lru_cache(maxsize=2)
def shapes_anycolor_dataset(n: int, seed: int = 0, image_size: int = 32, start: int = 0) -> ImageDataset:
    """Images start .. start+n-1 of "shapes-anycolor" (no labels: half its colours have no name)."""
    images, captions = _render_all("shapes-anycolor", n, image_size,
                                   lambda i: shapes_anycolor_example(seed, start + i, image_size))
    return ImageDataset(images, captions)


def shapes_silhouette_example(seed: int, index: int, image_size: int = 32):
    """(image, silhouette [H, W] uint8, (color, shape, background)) of shapes image `index`."""
    g = shape_geometry(seed, index, image_size)
    image = render_shape(g.color, g.shape, g.background, g.center, g.radius, image_size)
    return image, render_silhouette(g.shape, g.center, g.radius, image_size), g.labels


def shapes_dataset(n: int, seed: int = 0, image_size: int = 32, start: int = 0) -> ImageDataset:
    """Images start .. start+n-1 of the shapes dataset with this seed (cached: runs in one process share it)."""
    return _shapes_dataset(n, seed, image_size, start)


def concept_dataset(concept: str, n: int, seed: int = 0, image_size: int = 32, start: int = 0) -> ImageDataset:
    """n images of one shape (a NEW_SHAPES name, or an old one) in every colour and background, or of one colour
    (a NEW_COLORS name, or an old one) in every shape and background; random size and position, captioned like
    "shapes": "a red star on a white background", "an orange circle on a gray background". A function of
    (seed, index): image i is shapes image i with its shape or colour replaced."""
    if concept in ALL_SHAPES:
        return _shapes_dataset(n, seed, image_size, start, shape=ALL_SHAPES.index(concept))
    if concept in ALL_COLORS:
        return _shapes_dataset(n, seed, image_size, start, color=ALL_COLOR_NAMES.index(concept))
    raise DataError(f"unknown concept {concept!r} (shapes: {', '.join(ALL_SHAPES)}; "
                    f"colours: {', '.join(ALL_COLOR_NAMES)})")


@functools.lru_cache(maxsize=4)
def _shapes_dataset(n: int, seed: int, image_size: int, start: int, shape: int | None = None,
                    color: int | None = None) -> ImageDataset:
    images, labels = _render_all("shapes", n, image_size,
                                 lambda i: shapes_example(seed, start + i, image_size, shape, color))
    labels = np.array(labels, np.int32).reshape(n, 3)
    return ImageDataset(images, [caption_for(*l) for l in labels], labels)


def _render_all(name: str, n: int, image_size: int, example) -> tuple[np.ndarray, list]:
    """A generated dataset's images [n, S, S, 3] uint8 (read-only: the caches share them) and the second item of
    each example(i) (labels, captions), i = 0 .. n-1."""
    if image_size not in (32, 64):
        raise DataError(f"{name}: image_size must be 32 or 64, got {image_size}")
    images = np.empty((n, image_size, image_size, 3), np.uint8)
    rest = []
    for i in range(n):
        images[i], item = example(i)
        rest.append(item)
    images.setflags(write=False)
    return images, rest


def load_image(path: Path, image_size: int) -> np.ndarray:
    """RGB, shorter side resized to image_size, center-cropped square: [S, S, 3] uint8."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        scale = image_size / min(w, h)
        im = im.resize((max(image_size, round(w * scale)), max(image_size, round(h * scale))), Image.BICUBIC)
        w, h = im.size
        left, top = (w - image_size) // 2, (h - image_size) // 2
        return np.asarray(im.crop((left, top, left + image_size, top + image_size)), dtype=np.uint8)


def image_folder_dataset(folder, image_size: int = 32, n: int | None = None) -> ImageDataset:
    """Every PNG/JPEG under `folder` (sorted), caption from the same-name .txt if there is one, else "".

    Unreadable images are skipped, counted and reported; an empty folder is an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DataError(f"no images in {folder}: expected {', '.join(IMAGE_SUFFIXES)} files")
    images, captions, bad = [], [], []
    for p in files:
        if n is not None and len(images) >= n:
            break
        try:
            images.append(load_image(p, image_size))
        except Exception as e:  # PIL raises many kinds for broken files
            bad.append(f"{p.name} ({type(e).__name__})")
            continue
        txt = p.with_suffix(".txt")
        captions.append(txt.read_text().strip() if txt.is_file() else "")
    if bad:
        logger.warning("skipped %d unreadable image(s) in %s: %s", len(bad), folder, ", ".join(bad[:10]))
    if not images:
        raise DataError(f"none of the {len(files)} image file(s) in {folder} could be read "
                        f"(skipped {len(bad)}: {', '.join(bad[:10])})")
    return ImageDataset(np.stack(images), captions, skipped=len(bad))


def hf_dataset(name: str, image_size: int = 32, n: int | None = None, split: str = "train",
               image_column: str = "image", caption_column: str = "text") -> ImageDataset:
    """A Hugging Face `datasets` dataset: a hub name (needs the network the first time, then its cache) or a
    local folder `datasets` can read (e.g. images + metadata.jsonl with a "text" column)."""
    try:
        import datasets
    except ImportError:
        raise DataError("the 'hf:' datasets need the `datasets` package (pip install datasets)") from None
    import io

    from PIL import Image

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # network, unknown name, no such split: datasets' own message, with ours around it
        raise DataError(f"hf:{name}: cannot load split {split!r} with datasets.load_dataset: "
                        f"{type(e).__name__}: {e}") from None
    for column in (image_column, caption_column):
        if column not in ds.column_names:
            raise DataError(f"hf:{name}: no column {column!r} (columns: {', '.join(ds.column_names)})")
    if n is not None:
        ds = ds.select(range(min(n, len(ds))))
    images, captions = [], []
    for row in ds:
        im = row[image_column]
        if isinstance(im, dict) and "bytes" in im:
            im = Image.open(io.BytesIO(im["bytes"]))
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format="PNG")
        buf.seek(0)
        images.append(load_image(buf, image_size))
        captions.append(str(row[caption_column]))
    if not images:
        raise DataError(f"hf:{name}: split {split!r} has no rows")
    return ImageDataset(np.stack(images), captions)


GENERATED = {"shapes": shapes_dataset, "shapes-anycolor": shapes_anycolor_dataset}  # built in, no download


def load_dataset(name: str, n: int | None, image_size: int, seed: int = 0, held_out: bool = False) -> ImageDataset:
    """"shapes" | "shapes-anycolor" | "folder:PATH" | "hf:NAME". held_out: the generated datasets' evaluation
    images (disjoint indices); for other datasets the caller splits off the last images."""
    if name in GENERATED:
        if n is None:
            raise DataError(f"{name}: the number of images must be given")
        return GENERATED[name](n, seed, image_size, start=HELD_OUT_START if held_out else 0)
    if name.startswith("folder:"):
        return image_folder_dataset(name[len("folder:"):], image_size, n)
    if name.startswith("hf:"):
        return hf_dataset(name[len("hf:"):], image_size, n)
    raise DataError(f"unknown dataset {name!r}: use 'shapes', 'shapes-anycolor', 'folder:PATH' or 'hf:NAME'")


def train_and_eval(name: str, n_train: int | None, n_eval: int, image_size: int, seed: int):
    """(train, eval) datasets. Generated ones: disjoint sets; others: the last n_eval images are held out."""
    if name in GENERATED:
        return (load_dataset(name, n_train, image_size, seed),
                load_dataset(name, n_eval, image_size, seed, held_out=True))
    ds = load_dataset(name, None if n_train is None else n_train + n_eval, image_size, seed)
    if len(ds) <= n_eval:
        raise DataError(f"{name}: {len(ds)} images, need more than num_eval_images={n_eval}")
    k = len(ds) - n_eval
    train = ImageDataset(ds.images[:k], ds.captions[:k], skipped=ds.skipped)
    return train, ImageDataset(ds.images[k:], ds.captions[k:])


def to_model_input(images_uint8: np.ndarray) -> np.ndarray:
    """uint8 [B, H, W, 3] -> float32 NCHW in [-1, 1] (diffusers' layout and range)."""
    x = images_uint8.astype(np.float32) / 127.5 - 1.0
    return x.transpose(0, 3, 1, 2)


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Indices of the batch at `step`: epoch-wise permutations drawn from (seed, epoch)."""
    if batch_size > n:
        raise DataError(f"batch_size {batch_size} is larger than the dataset ({n} images)")
    per_epoch = n // batch_size
    epoch, k = divmod(step, per_epoch)
    perm = _permutation(n, seed, epoch)
    return perm[k * batch_size:(k + 1) * batch_size]


_PERM_CACHE: dict = {}


def _permutation(n, seed, epoch):
    key = (n, seed, epoch)
    if key not in _PERM_CACHE:
        _PERM_CACHE.clear()
        _PERM_CACHE[key] = np.random.default_rng([seed, epoch, 7]).permutation(n)
    return _PERM_CACHE[key]
