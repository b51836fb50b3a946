"""Pixel-level similarity between two image sets: PSNR and SSIM, paired image by image.

Images are float arrays in [0, 1] of shape (N, H, W, 3) (a single (H, W, 3) image is accepted
too). Both metrics are computed per image pair and averaged over the set.

Infinity convention: the PSNR of an identical pair is ``inf``. In the set mean an identical pair
counts as ``PSNR_CAP`` dB, so one bit-exact image cannot hide damage on the others; the mean is
``inf`` only when every pair is identical. JSON has no infinity, so the report writers store a
non-finite value as ``null`` and set ``quality.identical_to_teacher`` to tell "identical" apart
from "not measurable" (see ``compress.report.build.to_jsonable``).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

# Above any PSNR a lossy image can reach at 8-bit precision for sizes we handle (a single
# 1/255 error in a 1024x1024 RGB image is ~113 dB, so 100 is a "practically identical" mark).
PSNR_CAP = 100.0

_SSIM_WINDOW = 11
_SSIM_SIGMA = 1.5
_SSIM_K1 = 0.01
_SSIM_K2 = 0.03


def _pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.ndim == 3:
        x = x[None]
    if y.ndim == 3:
        y = y[None]
    if x.shape != y.shape:
        raise ValueError(f"image sets differ in shape: {x.shape} vs {y.shape}")
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected images of shape (N, H, W, 3), got {x.shape}")
    if x.shape[0] == 0:
        raise ValueError("empty image set")
    return x, y


def psnr_per_image(a, b) -> np.ndarray:
    """PSNR in dB of each pair (peak 1.0); ``inf`` where a pair is identical."""
    x, y = _pair(a, b)
    mse = ((x - y) ** 2).mean(axis=(1, 2, 3))
    with np.errstate(divide="ignore"):
        return np.where(mse > 0, -10.0 * np.log10(np.maximum(mse, 1e-300)), np.inf)


def psnr(a, b) -> float:
    """Mean PSNR in dB over image pairs (peak 1.0).

    Returns ``inf`` when every pair is identical; otherwise identical pairs count as
    ``PSNR_CAP`` in the mean.
    """
    per = psnr_per_image(a, b)
    if np.isinf(per).all():
        return math.inf
    return float(np.minimum(per, PSNR_CAP).mean())


def _gaussian_kernel(size: int, sigma: float) -> np.ndarray:
    r = (size - 1) / 2.0
    t = np.arange(size, dtype=np.float64) - r
    k = np.exp(-(t**2) / (2.0 * sigma**2))
    return k / k.sum()


def _window_for(h: int, w: int) -> tuple[int, float]:
    """The 11-px, sigma-1.5 window, shrunk (odd size, same sigma-to-size ratio) for tiny images."""
    side = min(h, w, _SSIM_WINDOW)
    if side % 2 == 0:
        side -= 1
    side = max(side, 1)
    return side, _SSIM_SIGMA * side / _SSIM_WINDOW


def ssim_per_image(a, b) -> np.ndarray:
    """SSIM of each pair: per-channel SSIM maps, averaged over channels and valid pixels.

    The standard formulation of Wang et al. (2004): Gaussian window of 11 px and sigma 1.5,
    K1 = 0.01, K2 = 0.03, dynamic range 1, statistics taken only where the window lies fully
    inside the image (no padding artefacts). Channels are scored separately and averaged rather
    than converted to luminance, because a hue shift with unchanged brightness (a red shape
    turning orange) is exactly the damage the demo checker cares about.
    """
    x, y = _pair(a, b)
    size, sigma = _window_for(x.shape[1], x.shape[2])
    kernel = _gaussian_kernel(size, sigma)
    pad = size // 2

    def blur(z: np.ndarray) -> np.ndarray:
        # Separable filtering then cropping the border equals a 'valid' 2-D convolution: the
        # kept pixels' windows never touch the padding mode.
        z = ndimage.correlate1d(z, kernel, axis=1, mode="reflect")
        z = ndimage.correlate1d(z, kernel, axis=2, mode="reflect")
        return z[:, pad : z.shape[1] - pad, pad : z.shape[2] - pad]

    c1 = (_SSIM_K1 * 1.0) ** 2
    c2 = (_SSIM_K2 * 1.0) ** 2
    mx, my = blur(x), blur(y)
    sxx = blur(x * x) - mx * mx
    syy = blur(y * y) - my * my
    sxy = blur(x * y) - mx * my
    num = (2 * mx * my + c1) * (2 * sxy + c2)
    den = (mx * mx + my * my + c1) * (sxx + syy + c2)
    return (num / den).mean(axis=(1, 2, 3))


def ssim(a, b) -> float:
    """Mean SSIM over image pairs (1.0 for identical sets); see ``ssim_per_image``."""
    return float(ssim_per_image(a, b).mean())
