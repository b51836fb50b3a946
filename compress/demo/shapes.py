"""Synthetic captioned images: coloured shapes on a grey background, captions from a small grammar.

The generator is seeded and unlimited. Geometry lives in normalised coordinates so the same
scene renders at any resolution; the demo model sees 32x32 renders, its VAE 256x256 ones.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 175, 60),
    "blue": (45, 85, 235),
    "yellow": (240, 220, 40),
    "purple": (150, 60, 205),
    "orange": (250, 140, 30),
    "white": (245, 245, 245),
    "cyan": (40, 215, 225),
}
BACKGROUND: tuple[int, int, int] = (90, 90, 90)
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.09, "large": 0.17}  # half-extent as a fraction of the image side
# 3x3 grid: (column, row) -> phrase; centres at 0.21 / 0.5 / 0.79 of the side
POSITIONS: dict[str, tuple[int, int]] = {
    "at the top left": (0, 0),
    "at the top": (1, 0),
    "at the top right": (2, 0),
    "on the left": (0, 1),
    "in the center": (1, 1),
    "on the right": (2, 1),
    "at the bottom left": (0, 2),
    "at the bottom": (1, 2),
    "at the bottom right": (2, 2),
}
CELL_CENTERS = (0.21, 0.5, 0.79)
JITTER = 0.02


@dataclass(frozen=True)
class Obj:
    """One object of a scene: its attributes and exact geometry."""

    color: str
    shape: str
    size: str
    position: str
    cx: float
    cy: float

    @property
    def radius(self) -> float:
        return SIZES[self.size]

    def phrase(self) -> str:
        return f"a {self.size} {self.color} {self.shape} {self.position}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]

    @property
    def caption(self) -> str:
        return " and ".join(o.phrase() for o in self.objects)


def _bbox(o: Obj) -> tuple[float, float, float, float]:
    r = o.radius
    return (o.cx - r, o.cy - r, o.cx + r, o.cy + r)


def _overlap(a: Obj, b: Obj, margin: float = 0.03) -> bool:
    ax0, ay0, ax1, ay1 = _bbox(a)
    bx0, by0, bx1, by1 = _bbox(b)
    return not (ax1 + margin < bx0 or bx1 + margin < ax0 or ay1 + margin < by0 or by1 + margin < ay0)


def sample_scene(rng: random.Random, n_objects: int | tuple[int, int] = 1) -> Scene:
    """Draw one scene. ``n_objects`` is a count or an inclusive (low, high) range (1 to 3)."""
    if isinstance(n_objects, tuple):
        n_objects = rng.randint(*n_objects)
    if not 1 <= n_objects <= 3:
        raise ValueError(f"n_objects must be 1..3, got {n_objects}")
    while True:
        cells = rng.sample(list(POSITIONS), n_objects)
        objs = []
        for pos in cells:
            col, row = POSITIONS[pos]
            objs.append(
                Obj(
                    color=rng.choice(list(COLORS)),
                    shape=rng.choice(SHAPES),
                    size=rng.choice(list(SIZES)),
                    position=pos,
                    cx=CELL_CENTERS[col] + rng.uniform(-JITTER, JITTER),
                    cy=CELL_CENTERS[row] + rng.uniform(-JITTER, JITTER),
                )
            )
        if all(not _overlap(a, b) for i, a in enumerate(objs) for b in objs[i + 1 :]):
            return Scene(tuple(objs))


def shape_mask(o: Obj, res: int) -> np.ndarray:
    """Boolean mask of one object at ``res`` x ``res`` (pixel centres sampled, no anti-aliasing)."""
    c = (np.arange(res, dtype=np.float32) + 0.5) / res
    dx = c[None, :] - o.cx
    dy = c[:, None] - o.cy
    r = o.radius
    if o.shape == "circle":
        return dx * dx + dy * dy <= r * r
    if o.shape == "square":
        # the full box: same extent as the circle (so size reads the same), 27% more area and
        # sharp corners, so the two stay apart at 32 px
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    if o.shape == "triangle":  # apex up, base down
        return (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
    raise ValueError(f"unknown shape {o.shape!r}")


def render(scene: Scene, res: int = 32, supersample: int = 8) -> np.ndarray:
    """Render to uint8 HxWx3. ``supersample`` > 1 anti-aliases by box-averaging a larger render."""
    big = res * supersample
    img = np.empty((big, big, 3), dtype=np.float32)
    img[:] = BACKGROUND
    for o in scene.objects:
        img[shape_mask(o, big)] = COLORS[o.color]
    if supersample > 1:
        img = img.reshape(res, supersample, res, supersample, 3).mean(axis=(1, 3))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def all_single_captions() -> list[str]:
    """Every one-object caption of the grammar (the demo model's training grammar)."""
    return [
        f"a {s} {c} {sh} {p}" for c in COLORS for sh in SHAPES for s in SIZES for p in POSITIONS
    ]


def parse_caption(caption: str) -> list[dict[str, str]]:
    """Split a grammar caption back into its objects' attributes; raises ValueError if foreign."""
    out = []
    for part in caption.strip().split(" and "):
        words = part.split(" ")
        if len(words) < 5 or words[0] != "a":
            raise ValueError(f"not a caption of the demo grammar: {caption!r}")
        size, color, shape, pos = words[1], words[2], words[3], " ".join(words[4:])
        if size not in SIZES or color not in COLORS or shape not in SHAPES or pos not in POSITIONS:
            raise ValueError(f"not a caption of the demo grammar: {caption!r}")
        out.append({"size": size, "color": color, "shape": shape, "position": pos})
    return out
