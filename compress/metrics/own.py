"""A user's own sampler: its output read as images or latents, and compared with the original's.

``sample_fn(module, seeds)`` returns images, (N, H, W, 3) or (N, 3, H, W) (one channel also
accepted) with values in [0, 1], or latents: any other float array with one entry per seed
(N, C, H, W with C not 1 or 3, video N, C, T, H, W, token grids...). Optionally it returns
``(samples, conditions)``, one condition per seed, which the metric callable receives.

Images are compared as saved PNGs would be (PSNR and SSIM on the 8-bit grid); latents by PSNR
with the original's value range over the whole set as the peak (no SSIM: a latent is not an
image), and the report says which it was.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from compress.errors import UserError
from compress.metrics.image import PSNR_CAP

IMAGES, LATENTS = "images", "latents"


def as_samples(x: Any) -> tuple[np.ndarray, str]:
    """A sampler's output as float32: ((N, H, W, 3) images in [0, 1], "images") or
    (the array as returned, "latents")."""
    if isinstance(x, torch.Tensor):
        arr = x.detach().float().cpu().numpy()
    else:
        try:
            arr = np.asarray(x, dtype=np.float32)
        except (TypeError, ValueError):
            raise UserError(f"sample_fn returned {type(x).__name__}; return a tensor or array of "
                            "images (N, H, W, 3) in [0, 1], or latents (N, ...)") from None
    arr = arr.astype(np.float32)
    if arr.ndim < 2:
        raise UserError(f"sample_fn returned shape {arr.shape}; return one sample per seed "
                        "(images N, H, W, 3 in [0, 1], or latents N, ...)")
    if not np.isfinite(arr).all():
        raise UserError("sample_fn returned NaN or infinite values")
    channels_first = arr.ndim == 4 and arr.shape[1] in (1, 3) and arr.shape[-1] not in (1, 3)
    image_shaped = arr.ndim == 4 and (channels_first or arr.shape[-1] in (1, 3))
    if not image_shaped:
        return arr, LATENTS
    if channels_first:
        arr = arr.transpose(0, 2, 3, 1)
    if arr.min() < -1e-3 or arr.max() > 1 + 1e-3:
        raise UserError(f"sample_fn returned image-shaped {arr.shape} with values in "
                        f"[{arr.min():.3g}, {arr.max():.3g}]; scale images to [0, 1] "
                        "(from [-1, 1]: (x + 1) / 2); latents are recognised by a channel "
                        "count other than 1 or 3")
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return np.clip(arr, 0.0, 1.0), IMAGES


def own_samples(sample_fn, module: nn.Module, seeds: list[int], chunk: int = 64,
                progress: bool = True):
    """Run a user's sampler over ``seeds`` in chunks: (samples, conditions or None, kind)."""
    from tqdm.auto import tqdm

    parts, conds, kinds = [], [], set()
    starts = range(0, len(seeds), chunk)
    for i in tqdm(starts, desc="sampling", leave=False, disable=not progress):
        part = list(seeds[i : i + chunk])
        with torch.no_grad():
            out = sample_fn(module, part)
        if isinstance(out, tuple) and len(out) == 2:
            out, c = out
            c = list(c)
            if len(c) != len(part):
                raise UserError(f"sample_fn returned {len(c)} conditions for {len(part)} seeds; "
                                "return one per seed")
            conds.extend(c)
        arr, kind = as_samples(out)
        if arr.shape[0] != len(part):
            raise UserError(f"sample_fn returned {arr.shape[0]} samples for {len(part)} seeds; "
                            "return one per seed")
        parts.append(arr)
        kinds.add(kind)
    if len({p.shape[1:] for p in parts}) > 1 or len(kinds) > 1:
        raise UserError("sample_fn returned samples of different shapes for different seeds")
    return np.concatenate(parts), (conds or None), kinds.pop()


def latent_psnr(ref: np.ndarray, got: np.ndarray) -> float:
    """Mean PSNR (dB) over samples, the peak being the reference set's value range."""
    if ref.shape != got.shape:
        raise UserError(f"sample_fn returned {got.shape} for the compressed module, "
                        f"{ref.shape} for the original")
    peak = float(ref.max() - ref.min()) or 1.0
    mse = ((ref.astype(np.float64) - got.astype(np.float64)) ** 2).reshape(len(ref), -1).mean(1)
    if not mse.any():
        return math.inf
    with np.errstate(divide="ignore"):
        per = np.where(mse > 0, 10.0 * np.log10(peak**2 / np.maximum(mse, 1e-300)), PSNR_CAP)
    return float(np.minimum(per, PSNR_CAP).mean())


def own_quality(teacher: np.ndarray, student: np.ndarray, kind: str) -> dict[str, Any]:
    """The report's quality figures for a user's samples (see the module docstring)."""
    if kind == IMAGES:
        from compress.metrics.evaluate import quality

        return {**quality(teacher, student, None, demo=False), "samples": IMAGES}
    p = latent_psnr(teacher, student)
    return {"psnr_vs_teacher": p, "identical_to_teacher": math.isinf(p), "ssim_vs_teacher": None,
            "frechet_vs_teacher": None, "n_images": int(student.shape[0]), "samples": LATENTS}


def judge(teacher: np.ndarray, student: np.ndarray, kind: str, metric_fn=None,
          conditions=None) -> dict[str, Any]:
    """Quality of a user's student samples against the teacher's: ``own_quality`` plus the
    user's metric for both (``prompt_accuracy`` / ``teacher_prompt_accuracy``, None without)."""
    q: dict[str, Any] = {"prompt_accuracy": None, "teacher_prompt_accuracy": None,
                         **own_quality(teacher, student, kind)}
    if metric_fn is not None:
        q["prompt_accuracy"] = float(metric_fn(student, conditions))
        q["teacher_prompt_accuracy"] = float(metric_fn(teacher, conditions))
        q["metric"] = getattr(metric_fn, "__name__", "metric_fn")
    return q


def sample_error(ref: np.ndarray, got: np.ndarray, kind: str) -> float:
    """10^(-PSNR/10) of two sample sets (0 when identical): mixed precision's image metric."""
    if kind == IMAGES:
        mse = float(np.mean((ref.astype(np.float64) - got.astype(np.float64)) ** 2))
        return mse
    p = latent_psnr(ref, got)
    return 0.0 if math.isinf(p) else 10.0 ** (-p / 10.0)
