"""Compare several compressed models: one markdown table and a quality-vs-bits plot with the
Pareto front (higher quality with fewer bits per weight) marked."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compress.errors import UserError
from compress.report.build import validate_report
from compress.report.markdown import (
    compression_seconds,
    fmt_bytes,
    fmt_num,
    fmt_pct,
    fmt_psnr,
    table,
)

_HEADER = [
    "name",
    "bits/weight",
    "bytes",
    "active params",
    "PSNR",
    "SSIM",
    "prompt accuracy",
    "FD",
    "latency/step (ms)",
    "compression (s)",
    "gates",
    "Pareto front",
]


@dataclass
class _Entry:
    name: str
    report: dict[str, Any]
    bits: float | None
    quality: float | None  # primary metric; inf for a bit-identical PSNR
    source: str = ""
    front: bool = False


def load_report(path: str | Path) -> tuple[str, dict[str, Any]]:
    """(display name, report) from an output directory or a report.json file."""
    p = Path(path)
    file = p / "report.json" if p.is_dir() else p
    if not file.is_file():
        raise UserError(
            f"no report at {p}: pass an output directory containing report.json (written by "
            "`dit-compress run` or `eval`) or the report.json file itself"
        )
    try:
        report = json.loads(file.read_text(encoding="utf-8"))
        validate_report(report)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError, TypeError) as exc:
        raise UserError(f"{file} is not a valid dit-compress report: {exc}") from None
    name = p.name if p.is_dir() else (file.parent.name or file.stem)
    return name, report


def _primary(reports: list[dict[str, Any]]) -> str:
    # Prompt accuracy is what the demo's captions make checkable and closest to "does the
    # image still show what was asked"; PSNR vs the teacher is measurable for every model.
    if reports and all(r["quality"].get("prompt_accuracy") is not None for r in reports):
        return "prompt_accuracy"
    return "psnr_vs_teacher"


def _quality_value(report: dict[str, Any], metric: str) -> float | None:
    q = report["quality"]
    value = q.get(metric)
    if metric == "psnr_vs_teacher" and value is None and q.get("identical_to_teacher"):
        return math.inf
    return None if value is None else float(value)


def source_of(report: dict[str, Any]) -> str:
    """The source model an output was made from: its path, family, class and size."""
    m = report.get("model") or {}
    params = m.get("params")
    size = f", {params / 1e6:.2f} M params" if isinstance(params, (int, float)) else ""
    cls = f" {m['class']}" if m.get("class") else ""
    return f"{m.get('path') or 'a module'} ({m.get('family', '?')}{cls}{size})"


def gates_failed(report: dict[str, Any]) -> list[str]:
    return [k for k, g in (report.get("gates") or {}).items()
            if isinstance(g, dict) and g.get("passed") is False]


def _eval_key(report: dict[str, Any]) -> str:
    ev = report.get("eval") or {}
    return repr((ev.get("prompts"), ev.get("seeds"), ev.get("steps"), ev.get("guidance"),
                 ev.get("resolution")))


def _mark_front(entries: list[_Entry]) -> None:
    """Pareto front per source model and evaluation set (rows that can be compared); an
    output whose gate failed is never on it."""
    for key in {(e.source, _eval_key(e.report)) for e in entries}:
        pts = [e for e in entries if (e.source, _eval_key(e.report)) == key
               and e.bits is not None and e.quality is not None and not gates_failed(e.report)]
        for e in pts:
            e.front = not any(
                o is not e
                and o.bits <= e.bits
                and o.quality >= e.quality
                and (o.bits < e.bits or o.quality > e.quality)
                for o in pts
            )


def _gates_cell(report: dict[str, Any]) -> str:
    gates = report.get("gates") or {}
    failed = gates_failed(report)
    if failed:
        return "FAILED: " + ", ".join(failed)
    checked = [k for k, g in gates.items() if isinstance(g, dict) and g.get("passed") is True]
    return f"passed ({len(checked)})" if checked else "-"


def _notes(entries: list[_Entry]) -> list[str]:
    """Which figures can be compared across the rows."""
    notes = []
    sources = sorted({e.source for e in entries})
    if len(sources) > 1:
        notes.append("Rows come from " + str(len(sources)) + " source models (column model); "
                     "quality and size compare only within one model, so each has its own "
                     "Pareto front.")
    for src in sources:
        evals: dict[str, list[str]] = {}
        for e in entries:
            if e.source == src:
                evals.setdefault(_eval_key(e.report), []).append(e.name)
        if len(evals) > 1:
            groups = "; ".join(", ".join(v) for v in evals.values())
            notes.append(f"Quality of {src} is not comparable across these groups (different "
                         f"evaluation prompts, seeds or sampler settings; each has its own "
                         f"front): {groups}.")
    cpus = {}
    for e in entries:
        sp = e.report.get("speed") or {}
        if sp.get("latency_ms_per_step") is not None:
            cpus.setdefault(f"{sp.get('cpu', 'unknown CPU')} / {sp.get('device', '?')}",
                            []).append(e.name)
    if len(cpus) > 1:
        notes.append("Latency was measured on different machines (" + "; ".join(
            f"{k}: {', '.join(v)}" for k, v in cpus.items()) + "): compare it within one.")
    elif cpus:
        notes.append(f"Latency: {next(iter(cpus))}, each row's own run (ratios to each row's "
                     "baseline in its report are the comparable figure).")
    failed = [e.name for e in entries if gates_failed(e.report)]
    if failed:
        notes.append("Failed a gate (kept out of the front): " + ", ".join(failed) + ".")
    return notes


def _row(e: _Entry) -> list[Any]:
    r = e.report
    size, speed, q = r["size"], r["speed"], r["quality"]
    secs = compression_seconds(r)
    lat = speed.get("latency_ms_per_step")
    return [
        e.name,
        fmt_num(size.get("bits_per_weight"), 2),
        fmt_bytes(size.get("bytes")),
        "-" if size.get("params_active") is None else f"{size['params_active'] / 1e6:.2f} M",
        fmt_psnr(q),
        fmt_num(q.get("ssim_vs_teacher"), 4),
        fmt_pct(q.get("prompt_accuracy")),
        fmt_num(q.get("frechet_vs_teacher"), 4),
        fmt_num(None if lat is None else float(lat), 2) + (" (simulated)"
                                                           if speed.get("simulated") else ""),
        fmt_num(secs, 1),
        _gates_cell(r),
        "yes" if e.front else "",
    ]


def _plot(entries: list[_Entry], metric: str, path: Path) -> None:
    # Figure + Agg canvas directly: no pyplot global state, no GUI backend, safe in threads.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    pts = [e for e in entries if e.bits is not None and e.quality is not None]
    finite = [e.quality for e in pts if math.isfinite(e.quality)]
    top = (max(finite) + 0.1 * (max(finite) - min(finite) or 1.0)) if finite else 1.0
    fig = Figure(figsize=(6.4, 4.4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)

    def y_of(e: _Entry) -> float:
        return e.quality if math.isfinite(e.quality) else top  # identical: drawn at the top

    for e in pts:
        if e.front:
            ax.scatter([e.bits], [y_of(e)], color="tab:blue", s=50, zorder=3)
        else:
            ax.scatter([e.bits], [y_of(e)], color="0.6", s=30)
        label = e.name + ("" if math.isfinite(e.quality) else " (identical)")
        ax.annotate(label, (e.bits, y_of(e)), textcoords="offset points", xytext=(5, 4), fontsize=8)
    front = sorted((e for e in pts if e.front), key=lambda e: e.bits)
    if front:
        ax.step(
            [e.bits for e in front],
            [y_of(e) for e in front],
            where="post",
            color="tab:blue",
            label="Pareto front",
        )
    if metric == "prompt_accuracy":
        teacher = [e.report["quality"].get("teacher_prompt_accuracy") for e in entries]
        teacher = [t for t in teacher if t is not None]
        if teacher:
            ax.axhline(float(teacher[0]), color="tab:green", ls="--", lw=1, label="teacher")
        ax.set_ylabel("prompt accuracy (checker, higher is better)")
    else:
        ax.set_ylabel("PSNR vs teacher, dB (higher is better)")
    ax.set_xlabel("bits per weight (fewer is better)")
    ax.set_title("Quality vs size")
    ax.grid(alpha=0.3)
    if front:
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", metadata={"Software": None})


def compare(
    paths: list[str | Path],
    out_md: str | Path | None = None,
    plot: str | Path | None = None,
) -> str:
    """Tabulate several reports and plot quality against bits per weight.

    Args:
        paths: output directories (containing report.json) or report.json files.
        out_md: where to write the markdown; None writes nothing.
        plot: where to write the PNG; None means next to ``out_md`` (same stem, .png) or no
            plot when ``out_md`` is None too.

    Returns:
        The markdown: one table, one row per report, then which metric the plot uses. The
        primary metric is prompt accuracy when every report has it, else PSNR vs teacher.

    Raises:
        UserError: a path holds no readable report.
    """
    if not paths:
        raise UserError("compare needs at least one output directory or report.json")
    loaded = [load_report(p) for p in paths]
    seen: dict[str, int] = {}
    entries = []
    metric = _primary([r for _, r in loaded])
    for name, report in loaded:
        seen[name] = seen.get(name, 0) + 1
        shown = name if seen[name] == 1 else f"{name} ({seen[name]})"
        bits = report["size"].get("bits_per_weight")
        entries.append(
            _Entry(
                shown, report, None if bits is None else float(bits),
                _quality_value(report, metric), source_of(report)
            )
        )
    _mark_front(entries)
    label = "prompt accuracy" if metric == "prompt_accuracy" else "PSNR vs teacher"
    many = len({e.source for e in entries}) > 1
    header = ["model", *_HEADER] if many else _HEADER
    md = table(header, [([e.source] if many else []) + _row(e) for e in entries])
    md += f"\n\nPareto front: higher {label} with fewer bits per weight"
    md += " (per source model).\n" if many else ".\n"
    for n in _notes(entries):
        md += f"\n{n}\n"
    plot_path = Path(plot) if plot is not None else None
    if plot_path is None and out_md is not None:
        plot_path = Path(out_md).with_suffix(".png")
    if plot_path is not None:
        _plot(entries, metric, plot_path)
        if out_md is not None:
            rel = _relative(plot_path, Path(out_md).parent)
            md += f"\n![{label} vs bits per weight]({rel})\n"
    if out_md is not None:
        Path(out_md).parent.mkdir(parents=True, exist_ok=True)
        Path(out_md).write_text(md, encoding="utf-8")
    return md


def _relative(path: Path, start: Path) -> str:
    try:
        return path.resolve().relative_to(start.resolve()).as_posix()
    except ValueError:
        return path.resolve().as_posix()
