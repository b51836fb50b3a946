"""report.html: one self-contained file (inline CSS, images as base64 PNG, no scripts) showing
the headline figures, gates, passes, and teacher vs student images for the same prompt and seed.
"""

from __future__ import annotations

import base64
import io
import json
import math
from dataclasses import dataclass
from html import escape
from typing import Any

import numpy as np
from PIL import Image

from compress.report.markdown import (
    dict_rows_table,
    display_name,
    fmt_num,
    fmt_pct,
    pass_details,
    summary_rows,
)

# Tiny images (the demo's 32 px) are scaled up by an integer factor to about this many CSS
# pixels with nearest-neighbour rendering, so every generated pixel stays visible and sharp.
_TARGET_PX = 160
# Large images are downscaled before embedding so a report of many 1024 px pairs stays openable.
_MAX_EMBED_PX = 512

_CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{margin-bottom:.2em} h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0} td,th{border:1px solid #ccc;padding:3px 8px;
text-align:left;font-size:14px} th{background:#f4f4f4}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:1em 0}
.card{border:1px solid #ddd;border-radius:6px;padding:10px 14px;min-width:130px}
.card .v{font-size:22px;font-weight:600} .card .l{font-size:12px;color:#666}
.pairs{display:flex;flex-wrap:wrap;gap:18px}
.pair{border:1px solid #ddd;border-radius:6px;padding:8px;max-width:min(100%,1060px)}
.pair .imgs{display:flex;gap:6px} .pair figure{margin:0;text-align:center;font-size:12px}
.pair img{display:block} img.tiny{image-rendering:pixelated}
.prompt{font-size:13px;margin-top:6px;max-width:340px} .meta{font-size:12px;color:#666}
.ok{color:#17762b} .bad{color:#b3261e} pre{background:#f6f6f6;padding:8px;overflow:auto}
"""


@dataclass
class ImagePair:
    """One prompt's teacher and student images with optional per-image annotations."""

    prompt: str
    seed: int | None
    student: np.ndarray
    teacher: np.ndarray | None = None
    psnr: float | None = None
    teacher_ok: bool | None = None
    student_ok: bool | None = None


def _png_b64(image: np.ndarray) -> tuple[str, int, int]:
    arr = np.rint(np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0) * 255).astype(np.uint8)
    img = Image.fromarray(arr)
    if max(img.size) > _MAX_EMBED_PX:
        scale = _MAX_EMBED_PX / max(img.size)
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img = img.resize(size, Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode("ascii"), img.width, img.height


def _img_tag(image: np.ndarray, alt: str) -> str:
    data, w, h = _png_b64(image)
    factor = max(1, _TARGET_PX // max(w, h)) if max(w, h) < _TARGET_PX else 1
    cls = ' class="tiny"' if factor > 1 else ""
    return (
        f'<img{cls} src="data:image/png;base64,{data}" alt="{escape(alt)}" '
        f'width="{w * factor}" height="{h * factor}">'
    )


def _verdict(ok: bool | None) -> str:
    if ok is None:
        return ""
    if ok:
        return ' <span class="ok">&#10003; checker</span>'
    return ' <span class="bad">&#10007; checker</span>'


def _table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, (dict, list)):
            return escape(json.dumps(v, separators=(",", ":")))
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return escape(fmt_num(v, 4))
        return escape("n/a" if v is None else str(v))

    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _cards(report: dict[str, Any]) -> str:
    wanted = (
        "Bits per weight",
        "Stored size",
        "PSNR vs teacher",
        "SSIM vs teacher",
        "Prompt accuracy",
        "Latency per step",
    )
    rows = dict(summary_rows(report))
    out = []
    for label in wanted:
        value = rows[label]
        # the cards show the headline number; the parenthesised comparison is in the table
        short = value.split(" (")[0]
        out.append(
            f'<div class="card"><div class="v">{escape(short)}</div>'
            f'<div class="l">{escape(label)}</div></div>'
        )
    return '<div class="cards">' + "".join(out) + "</div>"


def _pair_html(i: int, pair: ImagePair) -> str:
    seed = "" if pair.seed is None else f"seed {pair.seed}"
    figs = []
    if pair.teacher is not None:
        figs.append(
            f"<figure>{_img_tag(pair.teacher, f'teacher {i}')}"
            f"<figcaption>teacher{_verdict(pair.teacher_ok)}</figcaption></figure>"
        )
    figs.append(
        f"<figure>{_img_tag(pair.student, f'student {i}')}"
        f"<figcaption>student{_verdict(pair.student_ok)}</figcaption></figure>"
    )
    meta = [seed]
    if pair.psnr is not None:
        meta.append("identical" if math.isinf(pair.psnr) else f"PSNR {pair.psnr:.2f} dB")
    meta_text = " · ".join(m for m in meta if m)
    return (
        f'<div class="pair"><div class="imgs">{"".join(figs)}</div>'
        f'<div class="prompt">{escape(pair.prompt)}</div>'
        f'<div class="meta">{escape(meta_text)}</div></div>'
    )


def _passes_html(report: dict[str, Any]) -> str:
    out = []
    for i, entry in enumerate(report.get("passes", []), 1):
        secs = entry.get("seconds")
        title = f"{i}. {entry.get('name')}" + ("" if secs is None else f" ({float(secs):.1f} s)")
        out.append(f"<h3>{escape(title)}</h3>")
        details = pass_details(entry)
        if details:
            out.append(_table(["key", "value"], [[k, v] for k, v in details]))
        for key, curve in _curves(entry):
            out.append(f"<p>{escape(key)}</p>{_loss_plot(curve, key)}")
        layers = entry.get("layers")
        if isinstance(layers, list) and layers and all(isinstance(r, dict) for r in layers):
            out.append(
                f"<details><summary>{len(layers)} layers</summary>"
                f"{_table(*dict_rows_table(layers))}</details>"
            )
    return "".join(out) or "<p>No passes.</p>"


def _curves(entry: dict[str, Any]) -> list[tuple[str, list]]:
    """The loss curves of a training pass ([[step, loss], ...]), its own and nested ones."""
    out = []
    for key, val in [("loss", entry), *((k, v) for k, v in entry.items() if isinstance(v, dict))]:
        curve = val.get("loss_curve") if isinstance(val, dict) else None
        if isinstance(curve, list) and len(curve) > 1:
            out.append((f"{key} curve" if key != "loss" else "loss curve", curve))
    return out


def _loss_plot(curve: list, title: str) -> str:
    """The curve as an inline PNG (log-scale loss against step)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 2.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(111)
    steps, loss = zip(*[(float(a), float(b)) for a, b in curve])
    ax.plot(steps, loss, lw=1.2)
    if min(loss) > 0:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{escape(title)}" width="500" height="260">'


def render_html(report: dict[str, Any], pairs: list[ImagePair] | None = None) -> str:
    """The whole report.html for a report in JSON form and optional image pairs."""
    quality = report["quality"]
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>dit-compress report: {escape(display_name(report))}</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>Compression report</h1>",
        _cards(report),
        "<h2>Summary</h2>",
        _table(["", "value"], [list(r) for r in summary_rows(report)]),
    ]
    gates = report.get("gates", {})
    if gates:
        rows = [[n, g.get("value"), g.get("threshold"),
                 "not measured" if g.get("passed") is None else g.get("passed")]
                for n, g in gates.items()]
        parts += ["<h2>Gates</h2>", _table(["gate", "value", "threshold", "passed"], rows)]
    by_attr = quality.get("prompt_accuracy_by_attribute")
    if by_attr:
        teacher = quality.get("teacher_prompt_accuracy_by_attribute") or {}
        rows = [[a, fmt_pct(v), fmt_pct(teacher.get(a))] for a, v in by_attr.items()]
        parts += [
            "<h2>Prompt accuracy by attribute</h2>",
            _table(["attribute", "student", "teacher"], rows),
        ]
    if pairs:
        parts += [
            "<h2>Teacher vs student</h2>",
            "<p class='meta'>Same prompt and seed; the teacher is the original model.</p>",
            '<div class="pairs">',
            *(_pair_html(i, p) for i, p in enumerate(pairs)),
            "</div>",
        ]
    parts += [
        "<h2>Passes</h2>",
        _passes_html(report),
        "<h2>Recipe</h2>",
        f"<pre>{escape(json.dumps(report.get('recipe'), indent=2))}</pre>",
        "</body></html>\n",
    ]
    return "\n".join(parts)
