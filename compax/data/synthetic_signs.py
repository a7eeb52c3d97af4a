"""synthetic_signs: a procedurally generated, imbalanced, traffic-sign-like dataset (no files).

Each class is a sign: a shape (circle, triangle, inverted triangle, square, diamond, octagon), rim
and fill colours and a glyph (bar, strokes, cross, upward or rightward arrow, dot, ring or none).
Some classes differ only by glyph, colour or shape, so a small CNN confuses them, but every class
differs from every other by something visible at 32x32 pixels: the octagon's outline is within
0.6 pixel of a circle's at the signs' sizes, so the stop sign has a white rim (no circular sign has
one), and the square one-way sign, whose outline alone was not learned beside the more frequent
circular "ahead only", points its arrow right instead of up. Every image draws one sign at a random
position, size and slight rotation, with colour jitter, on a textured background, then applies
random lighting, contrast, blur and noise. Class frequencies decay geometrically (the most frequent
class is `IMBALANCE` times the rarest), as in GTSRB. `boxes` holds each sign's bounding box.

Everything is vectorised numpy, deterministic from the seed.
"""

import numpy as np

from compax.data import splits
from compax.data.dataset import Dataset, Split

NAME = "synthetic_signs"
SIZE = 32
NUM_TRAIN = 12_000
NUM_TEST = 3_000
TRAIN_SEED = 0
TEST_SEED = 1
IMBALANCE = 10.0
_CHUNK = 1000  # images rendered at once (bounds memory; part of the definition of the stream)

_COLOURS = {
    "red": (0.80, 0.10, 0.12),
    "blue": (0.10, 0.30, 0.75),
    "white": (0.95, 0.95, 0.95),
    "yellow": (0.95, 0.80, 0.10),
    "black": (0.08, 0.08, 0.08),
}
# name: (sides (0: circle), angle of the first edge normal (degrees, y down), apothem, glyph scale)
_SHAPES = {
    "circle": (0, 0.0, 1.0, 0.6),
    "triangle": (3, 90.0, 0.6, 0.38),
    "inverted triangle": (3, -90.0, 0.6, 0.38),
    "square": (4, 0.0, 0.85, 0.62),
    "diamond": (4, 45.0, 0.8, 0.45),
    "octagon": (8, 22.5, 0.95, 0.6),
}


def _box(u, v, half_width, half_height):
    """Signed distance-like function of an axis-aligned box (negative inside)."""
    return np.maximum(np.abs(u) - half_width, np.abs(v) - half_height)


def _cross(u, v):
    """Distance-like function of an X of two diagonal bars."""
    a, b = (u + v) / np.sqrt(2), (u - v) / np.sqrt(2)
    return np.minimum(_box(a, b, 0.85, 0.18), _box(b, a, 0.85, 0.18))


def _arrow(u, v):
    """Distance-like function of an upward arrow: a shaft under a triangular head."""
    head = np.maximum.reduce(
        [(v + 0.35) * np.sin(t) + u * np.cos(t) - 0.3 for t in np.deg2rad((90, 210, 330))]
    )
    return np.minimum(_box(u, v - 0.25, 0.16, 0.55), head)


# Glyphs as distance-like functions of glyph coordinates (negative inside; they fit in [-1, 1]^2).
_GLYPH_DISTANCE = {
    "none": lambda u, v: np.full_like(u, np.inf),
    "bar": lambda u, v: _box(u, v, 0.8, 0.22),
    "one": lambda u, v: _box(u, v, 0.2, 0.75),
    "two": lambda u, v: np.minimum(_box(u - 0.35, v, 0.17, 0.75), _box(u + 0.35, v, 0.17, 0.75)),
    "cross": _cross,
    "arrow": _arrow,
    "right arrow": lambda u, v: _arrow(v, -u),
    "dot": lambda u, v: np.hypot(u, v) - 0.4,
    "ring": lambda u, v: np.abs(np.hypot(u, v) - 0.55) - 0.16,
}
_GLYPHS = tuple(_GLYPH_DISTANCE)


def _glyph_distance(glyph: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The distance-like function of glyph `glyph[i]` (an index into `_GLYPHS`) at `u[i], v[i]`."""
    out = np.empty_like(u)
    for index, name in enumerate(_GLYPHS):
        chosen = glyph == index
        out[chosen] = _GLYPH_DISTANCE[name](u[chosen], v[chosen])
    return out


# (name, shape, rim colour, fill colour, glyph, glyph colour), most frequent first.
CLASSES = (
    ("limit one", "circle", "red", "white", "one", "black"),
    ("limit zero", "circle", "red", "white", "ring", "black"),
    ("limit eleven", "circle", "red", "white", "two", "black"),
    ("no entry", "circle", "red", "red", "bar", "white"),
    ("blue bar", "circle", "blue", "blue", "bar", "white"),
    ("ahead only", "circle", "blue", "blue", "arrow", "white"),
    ("caution", "triangle", "red", "white", "one", "black"),
    ("crossroads", "triangle", "red", "white", "cross", "black"),
    ("dot warning", "triangle", "red", "white", "dot", "black"),
    ("yield", "inverted triangle", "red", "white", "none", "black"),
    ("priority road", "diamond", "white", "yellow", "none", "black"),
    ("end of priority", "diamond", "white", "yellow", "cross", "black"),
    ("stop", "octagon", "white", "red", "bar", "white"),
    ("one way", "square", "blue", "blue", "right arrow", "white"),
    ("parking", "square", "blue", "blue", "dot", "white"),
)
CLASS_NAMES = tuple(c[0] for c in CLASSES)
_RIM = 0.2  # rim width, in units of the sign's radius


def class_counts(num_images: int) -> np.ndarray:
    """Images per class: geometric decay from class 0 to the last, ratio `IMBALANCE`, sum
    `num_images`."""
    k = len(CLASSES)
    weights = IMBALANCE ** (-np.arange(k) / (k - 1))
    counts = np.floor(num_images * weights / weights.sum()).astype(np.int64)
    counts[: num_images - counts.sum()] += 1
    return counts


def _class_table() -> dict[str, np.ndarray]:
    """Per-class rendering parameters as arrays indexed by label."""
    shapes = [_SHAPES[c[1]] for c in CLASSES]
    sides = np.array([s[0] for s in shapes])
    first = np.deg2rad([s[1] for s in shapes])
    # Eight edge-normal angles per class; a k-gon repeats its k normals (angles wrap at 2 pi).
    normals = first[:, None] + 2 * np.pi * np.arange(8) / np.maximum(sides, 1)[:, None]
    apothem = np.array([s[2] for s in shapes])
    table = {
        "circle": sides == 0,
        "normals": normals,
        "apothem": apothem,
        "radius": np.where(sides == 0, 1.0, apothem / np.cos(np.pi / np.maximum(sides, 3))),
        "glyph_scale": np.array([s[3] for s in shapes]),
        "glyph": np.array([_GLYPHS.index(c[4]) for c in CLASSES]),
        "rim": np.array([_COLOURS[c[2]] for c in CLASSES]),
        "fill": np.array([_COLOURS[c[3]] for c in CLASSES]),
        "ink": np.array([_COLOURS[c[5]] for c in CLASSES]),
    }
    return {k: a.astype(np.float32) if a.dtype == np.float64 else a for k, a in table.items()}


_TABLE = _class_table()


def _upsample(field: np.ndarray) -> np.ndarray:
    """Bilinear upsampling of (n, g, g, 3) grids to (n, SIZE, SIZE, 3) float32."""
    g = field.shape[1]
    pos = np.clip((np.arange(SIZE) + 0.5) * g / SIZE - 0.5, 0, g - 1)
    low = np.minimum(pos.astype(int), g - 2)
    interp = np.zeros((SIZE, g), np.float32)
    interp[np.arange(SIZE), low] = 1 - (pos - low)
    interp[np.arange(SIZE), low + 1] = pos - low
    channels_first = field.astype(np.float32).transpose(0, 3, 1, 2)
    return (interp @ channels_first @ interp.T).transpose(0, 2, 3, 1)


def _blur(images: np.ndarray) -> np.ndarray:
    """3x3 binomial blur of (n, H, W, C) images, edges replicated."""
    p = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    rows = (p[:, :-2] + 2 * p[:, 1:-1] + p[:, 2:]) / 4
    return (rows[:, :, :-2] + 2 * rows[:, :, 1:-1] + rows[:, :, 2:]) / 4


def _render(labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(images (n, SIZE, SIZE, 3) uint8, boxes (n, 4) float32) for one chunk of labels."""
    n, t = len(labels), _TABLE
    circle, apothem, extent = t["circle"][labels], t["apothem"][labels], t["radius"][labels]

    def uniform(low, high, shape):
        return rng.uniform(low, high, shape).astype(np.float32)

    scale = uniform(6.0, 12.0, n)  # sign radius in pixels
    margin = extent * scale + 0.5
    cx, cy = (uniform(margin, SIZE - margin, n) for _ in range(2))
    angle = np.deg2rad(uniform(-12, 12, n))
    jitter = uniform(0.8, 1.2, (n, 1, 3)) * uniform(0.85, 1.15, (n, 1, 1))

    grid = np.arange(SIZE, dtype=np.float32) + 0.5
    dx = grid[None, None, :] - cx[:, None, None]
    dy = grid[None, :, None] - cy[:, None, None]
    cos, sin = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    s = scale[:, None, None]
    u, v = (dx * cos + dy * sin) / s, (dy * cos - dx * sin) / s

    normals = t["normals"][labels][:, :, None, None]
    polygon = (u[:, None] * np.cos(normals) + v[:, None] * np.sin(normals)).max(axis=1)
    edge = np.where(circle[:, None, None], np.hypot(u, v) - 1, polygon - apothem[:, None, None])
    outer = np.clip(0.5 - edge * s, 0, 1)
    inner = np.clip(0.5 - (edge + _RIM) * s, 0, 1)
    glyph_scale = t["glyph_scale"][labels][:, None, None]
    glyph = _glyph_distance(t["glyph"][labels], u / glyph_scale, v / glyph_scale)
    ink = np.clip(0.5 - glyph * glyph_scale * s, 0, 1) * inner

    def colour(name):
        return t[name][labels][:, None, None] * jitter[:, None]

    sign = colour("rim") + inner[..., None] * (colour("fill") - colour("rim"))
    sign += ink[..., None] * (colour("ink") - sign)
    background = _upsample(uniform(0, 1, (n, 4, 4, 3))) + 0.35 * _upsample(
        uniform(-1, 1, (n, 8, 8, 3))
    )
    images = background + outer[..., None] * (sign - background)

    slope = uniform(-0.02, 0.02, (n, 2, 1, 1))
    centred = grid - SIZE / 2
    lighting = 1 + slope[:, 0] * centred[None, None, :] + slope[:, 1] * centred[None, :, None]
    images *= lighting[..., None]
    mean = images.mean(axis=(1, 2, 3), keepdims=True)
    contrast = uniform(0.45, 1.2, (n, 1, 1, 1))
    images = (images - mean) * contrast + mean + uniform(-0.25, 0.25, (n, 1, 1, 1))
    images += uniform(0, 1, (n, 1, 1, 1)) * (_blur(images) - images)
    images += rng.standard_normal(images.shape, np.float32) * uniform(0.01, 0.08, (n, 1, 1, 1))

    mask = outer > 0.5
    cols, rows = mask.any(axis=1), mask.any(axis=2)
    boxes = np.stack(
        [
            cols.argmax(axis=1),
            rows.argmax(axis=1),
            SIZE - cols[:, ::-1].argmax(axis=1),
            SIZE - rows[:, ::-1].argmax(axis=1),
        ],
        axis=1,
    )
    assert images.dtype == np.float32
    return (np.clip(images, 0, 1) * 255 + 0.5).astype(np.uint8), boxes.astype(np.float32)


def generate(num_images: int, seed: int) -> Split:
    """`num_images` images in random class order, deterministic from `seed`; class frequencies
    from `class_counts`."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(len(CLASSES)), class_counts(num_images)))
    images, boxes = zip(
        *(_render(labels[i : i + _CHUNK], rng) for i in range(0, num_images, _CHUNK)),
        strict=True,
    )
    return Split(
        images=np.concatenate(images), labels=labels.astype(np.int32), boxes=np.concatenate(boxes)
    )


def load(data_dir: str | None, *, split_seed: int, val_fraction: float, download: bool) -> Dataset:
    """The generated dataset: `NUM_TRAIN` train images (`val_fraction` of each class held out as
    val, seeded by `split_seed`) and `NUM_TEST` test images. `data_dir` and `download` are unused:
    the data needs no files."""
    full, test = generate(NUM_TRAIN, TRAIN_SEED), generate(NUM_TEST, TEST_SEED)
    train_index, val_index = splits.stratified_split(full.labels, val_fraction, split_seed)
    return Dataset.create(NAME, CLASS_NAMES, full.take(train_index), full.take(val_index), test)
