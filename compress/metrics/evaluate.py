"""Sample a pipeline on fixed prompts and seeds, cache the original model's images, and score a
compressed model's images against them.

All comparisons happen on the 8-bit grid (values k/255): that is what a user saves and looks
at, it lets the teacher cache hold compact uint8 arrays without biasing the metrics, and a
student that is bit-equal to the teacher still scores PSNR ``inf``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import secrets
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from compress.demo.shapes import parse_caption
from compress.errors import UserError
from compress.metrics import checker
from compress.metrics.frechet import frechet_distance
from compress.metrics.image import psnr, ssim
from compress.models.base import ModelHandle

log = logging.getLogger(__name__)

_CACHE_ENV = "DIT_COMPRESS_CACHE"
_CACHE_VERSION = 1  # bump when the cached content or key recipe changes


def to_8bit_grid(images) -> np.ndarray:
    """Round float images in [0, 1] to the nearest k/255 (float32), as saving a PNG would."""
    x = np.clip(np.asarray(images, dtype=np.float32), 0.0, 1.0)
    return np.rint(x * 255.0).astype(np.float32) / 255.0


def sample_images(
    handle: ModelHandle,
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int,
    guidance: float | None,
    resolution: int | None,
    batch_size: int = 4,
) -> np.ndarray:
    """Generate one image per prompt with ``handle``'s pipeline.

    Each prompt carries its own seed, so the batch size does not change the images (as long as
    the family adapter seeds per image, which the adapter contract requires).

    Args:
        handle: a loaded model with a pipeline and an adapter that can ``generate``.
        prompts: the prompts, one image each.
        seeds: one seed per prompt.
        steps: denoising steps.
        guidance: classifier-free guidance scale, or None for the family default.
        resolution: image side in pixels, or None for the family default.
        batch_size: prompts per pipeline call.

    Returns:
        float32 array (N, H, W, 3) in [0, 1].
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    if not prompts:
        raise ValueError("no prompts to sample")
    if handle.pipeline is None or handle.adapter.generate is None:
        raise UserError(
            f"cannot sample images from a bare module ({handle.family}): evaluation needs a "
            "diffusers pipeline; load the model from a pipeline directory"
        )
    out = []
    starts = range(0, len(prompts), batch_size)
    for i in tqdm(starts, desc="sampling", unit="batch", disable=None):
        batch_p = list(prompts[i : i + batch_size])
        batch_s = [int(s) for s in seeds[i : i + batch_size]]
        imgs = np.asarray(
            handle.adapter.generate(handle.pipeline, batch_p, batch_s, steps, guidance, resolution),
            dtype=np.float32,
        )
        if imgs.ndim != 4 or imgs.shape[0] != len(batch_p) or imgs.shape[-1] != 3:
            raise RuntimeError(
                f"{handle.family} adapter returned shape {imgs.shape} for {len(batch_p)} prompts; "
                "expected (N, H, W, 3)"
            )
        out.append(imgs)
    return np.concatenate(out, axis=0)


def cache_root() -> Path:
    """Root of dit-compress caches: $DIT_COMPRESS_CACHE, else ~/.cache/dit-compress."""
    env = os.environ.get(_CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dit-compress"


def teacher_key(
    source_hash: str,
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int,
    guidance: float | None,
    resolution: int | None,
) -> str:
    """sha256 naming one set of teacher images: same inputs, same images."""
    blob = json.dumps(
        {
            "version": _CACHE_VERSION,
            "source_hash": source_hash,
            "prompts": list(prompts),
            "seeds": [int(s) for s in seeds],
            "steps": int(steps),
            "guidance": None if guidance is None else float(guidance),
            "resolution": None if resolution is None else int(resolution),
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _load_cached(path: Path, n: int) -> np.ndarray | None:
    try:
        with np.load(path, allow_pickle=False) as data:
            images = data["images"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        log.warning("ignoring unreadable teacher cache %s (%s); resampling", path, exc)
        return None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] != n:
        log.warning("ignoring teacher cache %s with unexpected shape %s", path, images.shape)
        return None
    return images


def _save_atomic(path: Path, images: np.ndarray, meta: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write a sibling temp file and rename: readers never see half a file, and two processes
    # filling the same entry both leave a complete one.
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:
            np.savez_compressed(f, images=images, meta=np.array(json.dumps(meta)))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def teacher_images(
    handle: ModelHandle,
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int,
    guidance: float | None,
    resolution: int | None,
    cache_dir: str | Path | None = None,
) -> np.ndarray:
    """The original (uncompressed) model's images, sampled once and cached on disk.

    ``handle`` must hold the original pipeline. Entries are keyed by ``teacher_key`` and stored
    as uint8 in ``<cache_dir>/<key>.npz``; ``cache_dir`` defaults to ``cache_root()/teacher``.
    Without ``handle.source_hash`` the model cannot be identified, so nothing is cached.

    Returns:
        float32 array (N, H, W, 3) on the 8-bit grid.
    """
    if handle.source_hash is None:
        log.info("model has no source hash; teacher images are not cached")
        return to_8bit_grid(sample_images(handle, prompts, seeds, steps, guidance, resolution))
    key = teacher_key(handle.source_hash, prompts, seeds, steps, guidance, resolution)
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root() / "teacher"
    path = root / f"{key}.npz"
    cached = _load_cached(path, len(prompts))
    if cached is not None:
        log.info("teacher images from cache %s", path)
        return cached.astype(np.float32) / 255.0
    images = sample_images(handle, prompts, seeds, steps, guidance, resolution)
    as_uint8 = np.rint(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8)
    meta = {"source_hash": handle.source_hash, "family": handle.family, "n": len(prompts)}
    _save_atomic(path, as_uint8, meta)
    return as_uint8.astype(np.float32) / 255.0


def _prompt_scores(images: np.ndarray, prompts: Sequence[str]) -> tuple[float, dict[str, float]]:
    acc = checker.accuracy(images, prompts)
    return acc["all"], {a: acc[a] for a in checker.ATTRIBUTES}


def _checkable(prompts: Sequence[str] | None) -> bool:
    if not prompts:
        return False
    try:
        for p in prompts:
            parse_caption(p)
    except ValueError as exc:
        log.warning("prompt accuracy not measured: %s", exc)
        return False
    return True


def quality(
    teacher: np.ndarray | None,
    student: np.ndarray,
    prompts: Sequence[str] | None,
    demo: bool,
) -> dict[str, Any]:
    """Quality of the student's images, paired with the teacher's (same prompts and seeds).

    Args:
        teacher: the original model's images (N, H, W, 3) in [0, 1], or None if unavailable.
        student: the compressed model's images, same shape.
        prompts: the prompt of each image (needed for prompt accuracy).
        demo: whether the prompts are demo-grammar captions the checker can verify.

    Returns:
        ``psnr_vs_teacher`` (dB, ``inf`` when identical), ``ssim_vs_teacher``,
        ``frechet_vs_teacher``, ``identical_to_teacher``, ``n_images``, and for the demo
        ``prompt_accuracy`` / ``teacher_prompt_accuracy`` (checker's ``all``) with per-attribute
        dicts ``prompt_accuracy_by_attribute`` / ``teacher_prompt_accuracy_by_attribute``.
        Values that cannot be measured are None.
    """
    stu = to_8bit_grid(student)
    out: dict[str, Any] = {
        "psnr_vs_teacher": None,
        "ssim_vs_teacher": None,
        "frechet_vs_teacher": None,
        "identical_to_teacher": None,
        "prompt_accuracy": None,
        "teacher_prompt_accuracy": None,
        "prompt_accuracy_by_attribute": None,
        "teacher_prompt_accuracy_by_attribute": None,
        "n_images": int(stu.shape[0]),
    }
    tea = None
    if teacher is not None:
        tea = to_8bit_grid(teacher)
        if tea.shape != stu.shape:
            raise ValueError(f"teacher images {tea.shape} and student images {stu.shape} differ")
        p = psnr(tea, stu)
        out["psnr_vs_teacher"] = p
        out["identical_to_teacher"] = math.isinf(p)
        out["ssim_vs_teacher"] = ssim(tea, stu)
        out["frechet_vs_teacher"] = frechet_distance(tea, stu)
    if demo and _checkable(prompts):
        assert prompts is not None
        if len(prompts) != stu.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {stu.shape[0]} images")
        out["prompt_accuracy"], out["prompt_accuracy_by_attribute"] = _prompt_scores(stu, prompts)
        if tea is not None:
            acc, by_attr = _prompt_scores(tea, prompts)
            out["teacher_prompt_accuracy"] = acc
            out["teacher_prompt_accuracy_by_attribute"] = by_attr
    return out
