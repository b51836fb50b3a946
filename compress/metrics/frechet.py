"""Fréchet distance between two image sets on fixed, hand-made features (no learned network).

FID's Inception features need a download and are blind to what compression does to flat-colour
images at 32 px, so this distance uses features that see exactly that damage:

- layout: an 8x8 area-averaged RGB thumbnail (192 values): where colour sits, colour shifts;
- palette: a soft 8-bin histogram per channel (24 values): new in-between colours from blur or
  banding, hue drift;
- edges: statistics of the luminance gradient and Laplacian (10 values): blur lowers them,
  noise and ringing raise them.

Each group is divided by the square root of its length so every group weighs the same however
many values it has. The distance is the usual
``|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))`` with a small ridge added to both
covariances (relative to their mean variance) so that sets of a few dozen images, whose sample
covariances are singular, still give a stable value. The number is only comparable between runs
with the same image size and set size: use it to rank recipes, not as an absolute score.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

_THUMB = 8
_BINS = 8
_EDGE_THRESHOLDS = (0.02, 0.05, 0.1, 0.2)
_LUMA = np.array([0.299, 0.587, 0.114])


def _as_batch(images) -> np.ndarray:
    x = np.asarray(images, dtype=np.float64)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected images of shape (N, H, W, 3), got {x.shape}")
    if x.shape[0] == 0:
        raise ValueError("empty image set")
    if min(x.shape[1], x.shape[2]) < 3:
        raise ValueError(f"images must be at least 3x3 pixels, got {x.shape[1]}x{x.shape[2]}")
    return np.clip(x, 0.0, 1.0)


def _thumbnail(x: np.ndarray) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    # adaptive pooling is plain area averaging and works for any size, even below 8 px
    small = F.adaptive_avg_pool2d(t, _THUMB)
    return small.reshape(x.shape[0], -1).numpy()


def _soft_histogram(x: np.ndarray) -> np.ndarray:
    # Linear (triangular) binning keeps features continuous in pixel values, so a slightly
    # larger colour shift always gives a slightly larger distance instead of jumping at edges.
    n, h, w, c = x.shape
    pos = x.transpose(0, 3, 1, 2).reshape(n * c, h * w) * (_BINS - 1)
    lo = np.clip(np.floor(pos).astype(np.int64), 0, _BINS - 2)
    frac = pos - lo
    base = (np.arange(n * c) * _BINS)[:, None]
    hist = np.bincount((base + lo).ravel(), (1 - frac).ravel(), minlength=n * c * _BINS)
    hist += np.bincount((base + lo + 1).ravel(), frac.ravel(), minlength=n * c * _BINS)
    return hist.reshape(n, c * _BINS) / (h * w)


def _edge_stats(x: np.ndarray) -> np.ndarray:
    n = x.shape[0]
    luma = x @ _LUMA
    gx = np.diff(luma, axis=2)[:, :-1, :]
    gy = np.diff(luma, axis=1)[:, :, :-1]
    mag = np.sqrt(gx**2 + gy**2).reshape(n, -1)
    lap = (
        luma[:, 1:-1, :-2]
        + luma[:, 1:-1, 2:]
        + luma[:, :-2, 1:-1]
        + luma[:, 2:, 1:-1]
        - 4 * luma[:, 1:-1, 1:-1]
    ).reshape(n, -1)
    # per-channel gradient energy catches colour fringes that cancel out in luminance
    chan = [np.abs(np.diff(x[..., c], axis=2)).mean(axis=(1, 2)) for c in range(3)]
    cols = [
        mag.mean(1),
        mag.std(1),
        *[(mag > t).mean(1) for t in _EDGE_THRESHOLDS],
        np.sqrt((lap**2).mean(1)),
        *chan,
    ]
    return np.stack(cols, axis=1)


def image_features(images) -> np.ndarray:
    """Feature vectors (N, 226) of images in [0, 1] shaped (N, H, W, 3); deterministic."""
    x = _as_batch(images)
    groups = [_thumbnail(x), _soft_histogram(x), _edge_stats(x)]
    return np.concatenate([g / np.sqrt(g.shape[1]) for g in groups], axis=1)


def _centered(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and rows scaled so that ``rows.T @ rows`` is the sample covariance."""
    mu = feats.mean(axis=0)
    n = feats.shape[0]
    if n < 2:
        return mu, np.zeros((0, feats.shape[1]))
    return mu, (feats - mu) / np.sqrt(n - 1)


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh(s)
    return (vecs * np.sqrt(np.clip(vals, 0.0, None))) @ vecs.T


def frechet_from_features(feats_a: np.ndarray, feats_b: np.ndarray, eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (rows are samples)."""
    mu_a, xa = _centered(np.asarray(feats_a, dtype=np.float64))
    mu_b, xb = _centered(np.asarray(feats_b, dtype=np.float64))
    d = mu_a.shape[0]
    if mu_b.shape[0] != d:
        raise ValueError(f"feature sizes differ: {d} vs {mu_b.shape[0]}")
    ridge = eps * max(float((xa**2).sum() + (xb**2).sum()) / (2 * d), 1e-12)
    # Both covariances equal the ridge outside the span of the samples, where their terms of
    # the distance cancel exactly; so with fewer samples than features, work in that span (a
    # k x k problem with k <= N_a + N_b) instead of d x d.
    rows = np.concatenate([xa, xb], axis=0)
    if 0 < rows.shape[0] < d:
        q, _ = np.linalg.qr(rows.T)
        xa, xb = xa @ q, xb @ q
    k = xa.shape[1]
    s_a = xa.T @ xa + ridge * np.eye(k)
    s_b = xb.T @ xb + ridge * np.eye(k)
    # Tr((S_a S_b)^(1/2)) = Tr((R S_b R)^(1/2)) with R = S_a^(1/2): a symmetric PSD matrix, so
    # eigh is stable where a general sqrtm of S_a S_b would return complex noise.
    r = _psd_sqrt(s_a)
    m = r @ s_b @ r
    tr_cross = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None)).sum()
    dist = float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * tr_cross)
    return max(dist, 0.0)


def frechet_distance(images_a, images_b, eps: float = 1e-6) -> float:
    """Fréchet distance between two image sets on ``image_features``.

    Args:
        images_a: float images in [0, 1], shape (N, H, W, 3).
        images_b: float images in [0, 1], shape (M, H', W', 3); sizes may differ from ``a``.
        eps: covariance ridge, relative to the mean feature variance.

    Returns:
        A non-negative float; ~0 for the same set, larger for more damage.
    """
    return frechet_from_features(image_features(images_a), image_features(images_b), eps)
