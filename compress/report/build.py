"""Validate a report dict and write its three views: report.json, report.md, report.html.

report.json follows schema 1 of DESIGN.md. JSON has no infinity or NaN, so every non-finite
float is written as null; a perfect PSNR is told apart from an unmeasured one by
``quality.identical_to_teacher`` (see ``compress.metrics.image``). The markdown and HTML views
are rendered from that JSON form, so all three always agree.
"""

from __future__ import annotations

import json
import math
import os
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from compress.demo.shapes import parse_caption
from compress.metrics import checker
from compress.metrics.evaluate import to_8bit_grid
from compress.metrics.image import psnr_per_image
from compress.report.html import ImagePair, render_html
from compress.report.markdown import render_markdown

SCHEMA = 1
REQUIRED: dict[str, tuple[str, ...]] = {
    "schema": (),
    "recipe": (),
    "recipe_hash": (),
    "model": ("path", "family", "params"),
    "passes": (),
    "size": ("params_total", "params_active", "bytes", "bits_per_weight"),
    "speed": ("latency_ms_per_step", "baseline_latency_ms_per_step", "peak_rss_mb"),
    "quality": ("psnr_vs_teacher", "ssim_vs_teacher", "prompt_accuracy", "teacher_prompt_accuracy"),
    "gates": (),
}
_PASS_KEYS = ("name", "seconds")
_GATE_KEYS = ("value", "threshold", "passed")


def validate_report(report: dict[str, Any]) -> None:
    """Raise ValueError naming the first required key (dotted path) that is missing.

    A key holding the wrong kind of value (a list where a dict belongs) raises TypeError.
    """
    if not isinstance(report, dict):
        raise TypeError(f"report must be a dict, got {type(report).__name__}")
    for key, subkeys in REQUIRED.items():
        if key not in report:
            raise ValueError(f"report is missing required key '{key}'")
        if subkeys and not isinstance(report[key], dict):
            raise TypeError(f"report key '{key}' must be a dict")
        for sub in subkeys:
            if sub not in report[key]:
                raise ValueError(f"report is missing required key '{key}.{sub}'")
    if report["schema"] != SCHEMA:
        raise ValueError(f"report schema {report['schema']!r} is not supported (expected {SCHEMA})")
    if not isinstance(report["passes"], list):
        raise TypeError("report key 'passes' must be a list")
    for i, entry in enumerate(report["passes"]):
        for sub in _PASS_KEYS:
            if not isinstance(entry, dict) or sub not in entry:
                raise ValueError(f"report is missing required key 'passes.{i}.{sub}'")
    if not isinstance(report["gates"], dict):
        raise TypeError("report key 'gates' must be a dict")
    for name, gate in report["gates"].items():
        for sub in _GATE_KEYS:
            if not isinstance(gate, dict) or sub not in gate:
                raise ValueError(f"report is missing required key 'gates.{name}.{sub}'")


def to_jsonable(obj: Any) -> Any:
    """A copy of ``obj`` that ``json.dumps(allow_nan=False)`` accepts.

    Non-finite floats become None; numpy scalars and arrays, tuples, Paths and pydantic models
    become their plain JSON counterparts.
    """
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "model_dump"):
        return to_jsonable(obj.model_dump(mode="json"))
    raise TypeError(f"cannot write {type(obj).__name__} to report.json")


def _mark_identical(report: dict[str, Any]) -> dict[str, Any]:
    """Record an infinite PSNR as ``identical_to_teacher`` before JSON turns it into null."""
    quality = report["quality"]
    value = quality.get("psnr_vs_teacher")
    is_inf = isinstance(value, (float, np.floating)) and math.isinf(value) and value > 0
    if not is_inf or quality.get("identical_to_teacher") is not None:
        return report
    return {**report, "quality": {**quality, "identical_to_teacher": True}}


def _write_atomic(path: Path, text: str) -> None:
    # A uniquely named sibling opened normally (not mkstemp, whose 0600 mode would ignore the
    # umask), then renamed: a reader never sees half a report.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _checkable(prompts: Sequence[str]) -> bool:
    try:
        for p in prompts:
            parse_caption(p)
    except ValueError:
        return False
    return True


def _pairs(
    report: dict[str, Any],
    teacher: np.ndarray | None,
    student: np.ndarray | None,
    prompts: Sequence[str] | None,
    seeds: Sequence[int] | None,
    max_pairs: int,
) -> list[ImagePair]:
    if student is None:
        return []
    stu = to_8bit_grid(student)
    n = stu.shape[0]
    tea = None if teacher is None else to_8bit_grid(teacher)
    if tea is not None and tea.shape != stu.shape:
        raise ValueError(f"teacher images {tea.shape} and student images {stu.shape} differ")
    if prompts is not None and len(prompts) != n:
        raise ValueError(f"{len(prompts)} prompts for {n} images")
    if seeds is not None and len(seeds) != n:
        raise ValueError(f"{len(seeds)} seeds for {n} images")
    n = min(n, max_pairs)
    texts = list(prompts[:n]) if prompts is not None else [f"image {i}" for i in range(n)]
    per_psnr = psnr_per_image(tea[:n], stu[:n]) if tea is not None else [None] * n
    # checker verdicts only where the report measured prompt accuracy (the demo grammar)
    verdicts = report["quality"].get("prompt_accuracy") is not None and prompts is not None
    verdicts = verdicts and _checkable(texts)
    out = []
    for i in range(n):
        out.append(
            ImagePair(
                prompt=texts[i],
                seed=None if seeds is None else int(seeds[i]),
                student=stu[i],
                teacher=None if tea is None else tea[i],
                psnr=None if per_psnr[i] is None else float(per_psnr[i]),
                teacher_ok=checker.check(tea[i], texts[i])["all"]
                if verdicts and tea is not None
                else None,
                student_ok=checker.check(stu[i], texts[i])["all"] if verdicts else None,
            )
        )
    return out


def write_report(
    out_dir: str | Path,
    report: dict[str, Any],
    teacher_images: np.ndarray | None = None,
    student_images: np.ndarray | None = None,
    prompts: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    max_pairs: int = 64,
) -> dict[str, Path]:
    """Write report.json, report.md and report.html into ``out_dir``.

    Args:
        out_dir: directory to write into (created if missing).
        report: the schema-1 report dict; extra keys are kept.
        teacher_images: the original model's images (N, H, W, 3) in [0, 1], optional.
        student_images: the compressed model's images for the same prompts and seeds.
        prompts: the prompt of each image, shown under each pair.
        seeds: the seed of each image, shown under each pair; defaults to
            ``report["eval"]["seeds"]`` when the report has it.
        max_pairs: at most this many pairs go into the HTML.

    Returns:
        {"json": path, "md": path, "html": path}.

    Raises:
        ValueError: a required key is missing (the message names it) or images mismatch.
    """
    validate_report(report)
    data = to_jsonable(_mark_identical(report))
    if seeds is None and isinstance(data.get("eval"), dict):
        seeds = data["eval"].get("seeds")
    pairs = _pairs(data, teacher_images, student_images, prompts, seeds, max_pairs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "md": out / "report.md", "html": out / "report.html"}
    _write_atomic(paths["json"], json.dumps(data, indent=2, allow_nan=False) + "\n")
    _write_atomic(paths["md"], render_markdown(data))
    _write_atomic(paths["html"], render_html(data, pairs))
    return paths
