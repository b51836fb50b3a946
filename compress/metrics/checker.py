"""Prompt-accuracy checker for the demo grammar: decides from an image whether each attribute
of its caption (colour, shape, size, position, count) holds. Deterministic, no learned parts."""

from __future__ import annotations

import itertools

import numpy as np
from scipy import ndimage

from compress.demo.shapes import COLORS, POSITIONS, parse_caption

ATTRIBUTES = ("color", "shape", "size", "position", "count")
_PALETTE_NAMES = list(COLORS)
_PALETTE = np.array([COLORS[c] for c in _PALETTE_NAMES], dtype=np.float32)
_CELL = {v: k for k, v in POSITIONS.items()}

# Thresholds in normalised units (fractions of the image side), set from the generator's geometry:
# small objects span ~0.18 of the side, large ~0.34. A triangle's vertical skew is about -0.57,
# a square's and a circle's 0. Square against circle: the share of the object's bounding box
# corners (four boxes of 20% of its side) that the object covers is 1.0 for a square and 0.14
# for a circle; 0.35 is what a square with corners rounded to three quarters of its half-side
# covers, so softened corners still read as a square and a circle never does.
_SIZE_SPLIT = 0.26
_CORNER_SQUARE = 0.35
_CORNER_BOX = 0.2
_SKEW_TRIANGLE = 0.25
_MIN_AREA = 0.008  # half the smallest object of the grammar (a small triangle): specks are not objects
_FG_DIST = 40.0


def _to_array(image) -> np.ndarray:
    arr = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    arr = arr.astype(np.float32)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 image, got shape {arr.shape}")
    if arr.max() <= 1.0 + 1e-6:  # float images in [0, 1]
        arr = arr * 255.0
    return arr


def _corner_cover(alpha: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> float:
    """Share of the object's bounding-box corners it covers (1.0 square, 0.14 circle).

    Small objects are judged on their coverage map upsampled (bilinear) to at least 32 pixels a
    side, so a 6-pixel circle is not mistaken for a square by whole-pixel rounding.
    """
    r0, r1 = max(rows[0] - 1, 0), min(rows[-1] + 2, alpha.shape[0])
    c0, c1 = max(cols[0] - 1, 0), min(cols[-1] + 2, alpha.shape[1])
    crop = alpha[r0:r1, c0:c1]
    side = min(rows[-1] - rows[0], cols[-1] - cols[0]) + 1
    if side < 32:
        crop = ndimage.zoom(crop, int(np.ceil(32 / side)), order=1, grid_mode=True, mode="nearest")
    solid = crop > 0.5
    rr, cc = np.where(solid.any(axis=1))[0], np.where(solid.any(axis=0))[0]
    box = solid[rr[0] : rr[-1] + 1, cc[0] : cc[-1] + 1]
    k = max(1, round(min(box.shape) * _CORNER_BOX))
    return float(np.mean([box[:k, :k].mean(), box[:k, -k:].mean(),
                          box[-k:, :k].mean(), box[-k:, -k:].mean()]))


def detect(image) -> list[dict]:
    """Find the objects in an image and describe each (colour, shape, size, position)."""
    img = _to_array(image)
    h, w, _ = img.shape
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    bg = np.median(border, axis=0)
    dist = np.linalg.norm(img - bg, axis=2)
    labels, n = ndimage.label(dist > _FG_DIST, structure=np.ones((3, 3)))
    objects = []
    ys = np.arange(h, dtype=np.float32)[:, None]  # row index, broadcast against each mask
    for idx in range(1, n + 1):
        comp = labels == idx
        if comp.sum() < _MIN_AREA * h * w:
            continue
        d = dist[comp]
        core = comp & (dist >= np.quantile(d, 0.5))
        color = img[core].mean(axis=0)
        # soft coverage: how far each pixel sits on the line from background to object colour
        region = ndimage.binary_dilation(comp, iterations=1)
        axis = color - bg
        alpha = ((img - bg) @ axis) / max(float(axis @ axis), 1e-6)
        alpha = np.clip(alpha, 0.0, 1.0) * region
        solid = alpha > 0.5
        if not solid.any():
            continue
        rows = np.where(solid.any(axis=1))[0]
        cols = np.where(solid.any(axis=0))[0]
        # soft extents: a partly covered edge column counts by its coverage (sub-pixel accurate)
        bw = alpha.max(axis=0).sum() / w
        bh = alpha.max(axis=1).sum() / h
        area = alpha.sum() / (h * w)
        fill = area / max(bw * bh, 1e-6)
        wsum = alpha.sum()
        my = (alpha * ys).sum() / wsum
        var = (alpha * (ys - my) ** 2).sum() / wsum
        skew = (alpha * (ys - my) ** 3).sum() / wsum / max(var, 1e-6) ** 1.5
        corners = _corner_cover(alpha, rows, cols)
        if skew < -_SKEW_TRIANGLE:
            shape = "triangle"
        elif corners >= _CORNER_SQUARE:
            shape = "square"
        else:
            shape = "circle"
        cx = (cols[0] + cols[-1] + 1) / 2 / w
        cy = (rows[0] + rows[-1] + 1) / 2 / h
        cell = (min(int(cx * 3), 2), min(int(cy * 3), 2))
        name = _PALETTE_NAMES[int(np.argmin(np.linalg.norm(_PALETTE - color, axis=1)))]
        objects.append(
            {
                "color": name,
                "shape": shape,
                "size": "large" if max(bw, bh) > _SIZE_SPLIT else "small",
                "position": _CELL[cell],
                "area": float(area),
                "fill": float(fill),
                "corners": corners,
                "skew": float(skew),
            }
        )
    return objects


def check(image, caption: str) -> dict[str, bool]:
    """Per-attribute verdicts for one image and its caption, plus ``all`` (every attribute holds)."""
    wanted = parse_caption(caption)
    found = detect(image)
    verdict = {"count": len(found) == len(wanted)}
    keys = ("color", "shape", "size", "position")
    best, best_score = None, -1
    # pair each captioned object with a distinct detected one, maximising agreement
    k = min(len(wanted), len(found))
    for perm in itertools.permutations(range(len(found)), k):
        score = sum(wanted[i][a] == found[j][a] for i, j in enumerate(perm) for a in keys)
        if score > best_score:
            best, best_score = perm, score
    for a in keys:
        hits = 0
        if best is not None:
            hits = sum(wanted[i][a] == found[j][a] for i, j in enumerate(best))
        verdict[a] = hits == len(wanted)
    verdict["all"] = all(verdict[a] for a in ATTRIBUTES)
    return verdict


def accuracy(images, captions) -> dict[str, float]:
    """Fraction of images for which each attribute (and ``all``) holds."""
    totals = dict.fromkeys((*ATTRIBUTES, "all"), 0)
    n = 0
    for img, cap in zip(images, captions, strict=True):
        v = check(img, cap)
        for key in totals:
            totals[key] += bool(v[key])
        n += 1
    return {key: val / max(n, 1) for key, val in totals.items()}
