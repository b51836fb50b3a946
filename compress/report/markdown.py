"""Text views of a report (its JSON form): the summary rows, report.md, and terminal lines.

Non-finite numbers are null in the JSON form; a null PSNR with
``quality.identical_to_teacher`` true is shown as "identical", any other null as "n/a".
"""

from __future__ import annotations

import json
import math
from typing import Any

NA = "n/a"


def fmt_num(value: Any, digits: int = 3) -> str:
    """A number with ``digits`` significant-ish decimals, or "n/a" when missing."""
    if value is None or isinstance(value, bool):
        return NA if value is None else str(value)
    if not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value > 0 else ("-inf" if value < 0 else "nan")
    if isinstance(value, int):
        return f"{value:,}"
    if value != 0 and abs(value) < 10 ** (-digits):
        return f"{value:.{digits - 1}e}"
    return f"{value:,.{digits}f}"


def fmt_bytes(value: Any) -> str:
    """Decimal units (1 MB = 1e6 bytes), as file managers and model hubs show sizes."""
    if value is None:
        return NA
    size = float(value)
    if abs(size) < 1000:
        return f"{size:.0f} B"
    for unit in ("KB", "MB", "GB"):
        size /= 1000.0
        if abs(size) < 1000:
            break
    return f"{size:.2f} {unit}"


def fmt_pct(value: Any) -> str:
    """A fraction in [0, 1] as a percentage."""
    return NA if value is None else f"{100.0 * float(value):.1f}%"


def fmt_psnr(quality: dict[str, Any]) -> str:
    """The PSNR of a quality dict, in memory (inf) or JSON form (null + identical flag)."""
    value = quality.get("psnr_vs_teacher")
    if isinstance(value, float) and math.isinf(value):
        return "identical"
    if value is None:
        return "identical" if quality.get("identical_to_teacher") else NA
    if quality.get("samples") == "latents":  # peak: the original's value range
        return f"{float(value):.2f} dB (latents)"
    return f"{float(value):.2f} dB"


def display_name(report: dict[str, Any]) -> str:
    """The model's path, or its family when it was a module passed from Python."""
    model = report["model"]
    if model.get("path"):
        return str(model["path"])
    return str(model.get("class") or f"{model.get('family')} model")


def compression_seconds(report: dict[str, Any]) -> float | None:
    """Total seconds of all passes, or None when no pass recorded its time."""
    secs = [p.get("seconds") for p in report.get("passes", []) if p.get("seconds") is not None]
    return float(sum(secs)) if secs else None


def _speed_text(speed: dict[str, Any]) -> str:
    lat, base = speed.get("latency_ms_per_step"), speed.get("baseline_latency_ms_per_step")
    if lat is None:
        return NA
    text = f"{float(lat):.2f} ms/step"
    if base and float(lat) > 0:
        ratio = float(base) / float(lat)
        word = "faster" if ratio >= 1 else "slower"
        shown = ratio if ratio >= 1 else 1 / ratio
        text += f" (baseline {float(base):.2f} ms, {shown:.2f}x {word})"
    packed = [d for d, k in (speed.get("kept_weight_gemm") or {}).items() if k == "onednn_packed"]
    if packed:
        # part of the gain is the kernel, which the original's nn.Linear does not use
        text += (f"; kept {'/'.join(packed)} weights ran oneDNN's packed GEMM (timed faster here "
                 "than torch's default; not a gain of the bits)")
    att = speed.get("attention") or []
    mm = [r for r in att if r.get("kernel") == "matmul"]
    if mm:
        text += (f"; attention ran as two matmuls and a softmax at {len(mm)} of {len(att)} "
                 "shapes (timed faster here than torch's fused kernel; the original would gain "
                 "it too: not a gain of the bits)")
    return text


def _gates_text(gates: dict[str, Any]) -> str:
    if not gates:
        return "none"
    skipped = [name for name, g in gates.items() if g.get("passed") is None]
    gates = {k: g for k, g in gates.items() if k not in skipped}
    failed = [name for name, g in gates.items() if not g.get("passed")]
    if skipped:
        note = f"{', '.join(skipped)} not measured"
        if not gates:
            return note
        rest = _gates_text(gates)
        return f"{rest}; {note}"
    if not failed:
        return f"all {len(gates)} passed"
    return f"{len(gates) - len(failed)}/{len(gates)} passed; failed: {', '.join(failed)}"


def summary_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, value) pairs of the headline figures, shared by the markdown and HTML views."""
    model, size = report["model"], report["size"]
    speed, quality = report["speed"], report["quality"]
    acc = quality.get("prompt_accuracy")
    acc_text = fmt_pct(acc)
    if acc is not None and quality.get("teacher_prompt_accuracy") is not None:
        acc_text += f" (teacher {fmt_pct(quality['teacher_prompt_accuracy'])})"
    secs = compression_seconds(report)
    params = fmt_num(size.get("params_total"))
    if size.get("params_active") not in (None, size.get("params_total")):
        params += f" ({fmt_num(size['params_active'])} active per token)"
    rss = speed.get("peak_rss_mb")
    return [
        (
            "Model",
            f"{display_name(report)} ({model.get('family')}, {fmt_num(model.get('params'))})",
        ),
        ("Recipe hash", str(report.get("recipe_hash", ""))[:12] or NA),
        ("Bits per weight", fmt_num(size.get("bits_per_weight"), 2)),
        ("Stored size", fmt_bytes(size.get("bytes"))),
        ("Parameters", params),
        ("Latency per step", _speed_text(speed)),
        ("Peak RSS", NA if rss is None else f"{float(rss):.0f} MB"),
        ("PSNR vs teacher", fmt_psnr(quality)),
        ("SSIM vs teacher", fmt_num(quality.get("ssim_vs_teacher"), 4)),
        ("Fréchet distance vs teacher", fmt_num(quality.get("frechet_vs_teacher"), 4)),
        ("Prompt accuracy", acc_text),
        ("Compression time", NA if secs is None else f"{secs:.1f} s"),
        ("Gates", _gates_text(report.get("gates", {}))),
    ]


def summary_lines(report: dict[str, Any]) -> list[str]:
    """A few lines for the terminal after a run."""
    size, speed, quality = report["size"], report["speed"], report["quality"]
    name = display_name(report)
    first = (
        f"{name}: {fmt_num(size.get('bits_per_weight'), 2)} bits/weight, "
        f"{fmt_bytes(size.get('bytes'))}"
    )
    q = [f"PSNR {fmt_psnr(quality)}", f"SSIM {fmt_num(quality.get('ssim_vs_teacher'), 4)}"]
    if quality.get("prompt_accuracy") is not None:
        acc = f"prompt accuracy {fmt_pct(quality['prompt_accuracy'])}"
        if quality.get("teacher_prompt_accuracy") is not None:
            acc += f" (teacher {fmt_pct(quality['teacher_prompt_accuracy'])})"
        q.append(acc)
    secs = compression_seconds(report)
    speed_line = f"latency {_speed_text(speed)}"
    if secs is not None:
        speed_line += f", compressed in {secs:.1f} s"
    lines = [first, "quality: " + ", ".join(q), speed_line]
    gates = report.get("gates", {})
    if gates:
        lines.append("gates: " + _gates_text(gates))
    return lines


def _cell(value: Any) -> str:
    if isinstance(value, (dict, list)):
        text = json.dumps(value, separators=(",", ":"))
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        text = fmt_num(value, 4)
    else:
        text = NA if value is None else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def table(header: list[str], rows: list[list[Any]]) -> str:
    """A GitHub-flavoured markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def dict_rows_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """Header (union of keys, first-seen order) and rows for a list of dicts."""
    header: list[str] = []
    for row in rows:
        header += [k for k in row if k not in header]
    return header, [[row.get(k) for k in header] for row in rows]


def pass_details(entry: dict[str, Any]) -> list[tuple[str, Any]]:
    """The pass-specific (key, value) items, without name, seconds and layers."""
    out = []
    for k, v in entry.items():
        if k in ("name", "seconds", "layers"):
            continue
        if k == "loss_curve" and isinstance(v, list):  # plotted in report.html
            v = f"{len(v)} points" + (f", {v[0][1]:.4g} -> {v[-1][1]:.4g}" if v else "")
        out.append((k, v))
    return out


def _attribute_table(quality: dict[str, Any]) -> str | None:
    student = quality.get("prompt_accuracy_by_attribute")
    teacher = quality.get("teacher_prompt_accuracy_by_attribute") or {}
    if not student:
        return None
    rows = [[a, fmt_pct(v), fmt_pct(teacher.get(a))] for a, v in student.items()]
    return table(["attribute", "student", "teacher"], rows)


def render_markdown(report: dict[str, Any]) -> str:
    """report.md: summary, gates, per-attribute accuracy, one section per pass, the recipe."""
    out = ["# Compression report", "", table(["", "value"], summary_rows(report)), ""]
    gates = report.get("gates", {})
    if gates:
        rows = [[n, g.get("value"), g.get("threshold"),
                 "not measured" if g.get("passed") is None else g.get("passed")]
                for n, g in gates.items()]
        out += ["## Gates", "", table(["gate", "value", "threshold", "passed"], rows), ""]
    attr = _attribute_table(report["quality"])
    if attr:
        out += ["## Prompt accuracy by attribute", "", attr, ""]
    out += ["## Passes", ""]
    for i, entry in enumerate(report.get("passes", []), 1):
        secs = entry.get("seconds")
        title = f"### {i}. {entry.get('name')}"
        out += [title + ("" if secs is None else f" ({float(secs):.1f} s)"), ""]
        details = pass_details(entry)
        out += [f"- **{k}**: {_cell(v)}" for k, v in details]
        if details:
            out.append("")
        layers = entry.get("layers")
        if isinstance(layers, list) and layers and all(isinstance(r, dict) for r in layers):
            out += [table(*dict_rows_table(layers)), ""]
    if not report.get("passes"):
        out += ["No passes.", ""]
    out += ["## Recipe", "", "```json", json.dumps(report.get("recipe"), indent=2), "```", ""]
    return "\n".join(out)
