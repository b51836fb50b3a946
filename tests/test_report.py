"""report.json / .md / .html writing, validation, terminal summary and multi-run comparison."""

from __future__ import annotations

import copy
import json
import math
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from scipy import ndimage

from compress.demo.shapes import render, sample_scene
from compress.errors import UserError
from compress.report import compare, summary_lines, to_jsonable, write_report
from compress.report.build import REQUIRED

torch.set_num_threads(1)


def _report(bits: float = 4.5, psnr: float = 31.2, acc: float | None = 0.8) -> dict[str, Any]:
    return {
        "schema": 1,
        "recipe": {"name": "w4a8", "passes": [{"ptq": {"weights": {"bits": 4}}}]},
        "recipe_hash": "ab" * 32,
        "model": {"path": "demo", "family": "pixart", "params": 1_234_567},
        "passes": [
            {
                "name": "ptq",
                "seconds": 12.5,
                "method": "gptq",
                "layers": [
                    {"layer": "blocks.0.attn.to_q", "role": "attn_qkv", "bits": 4, "err": 0.01},
                    {"layer": "blocks.0.ff.net.2", "role": "ff_out", "bits": 8, "err": 0.002},
                ],
            },
            {"name": "prune_depth", "seconds": 3.0, "removed": [3, 7]},
        ],
        "size": {
            "params_total": 1_234_567,
            "params_active": 1_234_567,
            "bytes": int(1_234_567 * bits / 8),
            "bits_per_weight": bits,
        },
        "speed": {
            "latency_ms_per_step": 10.0,
            "baseline_latency_ms_per_step": 12.0,
            "peak_rss_mb": np.float64(512.0),
        },
        "quality": {
            "psnr_vs_teacher": psnr,
            "ssim_vs_teacher": 0.95,
            "frechet_vs_teacher": 0.002,
            "prompt_accuracy": acc,
            "teacher_prompt_accuracy": None if acc is None else 0.9,
            "prompt_accuracy_by_attribute": None if acc is None else {"color": acc, "shape": 0.7},
            "teacher_prompt_accuracy_by_attribute": None,
        },
        "gates": {"psnr_min": {"value": psnr, "threshold": 25.0, "passed": psnr >= 25.0}},
    }


def _images(n: int) -> tuple[np.ndarray, np.ndarray, list[str], list[int]]:
    seeds = list(range(n))
    scenes = [sample_scene(random.Random(s), 1) for s in seeds]
    teacher = np.stack([render(s) for s in scenes]).astype(np.float32) / 255.0
    student = ndimage.gaussian_filter(teacher, sigma=(0, 0.7, 0.7, 0))
    return teacher, student, [s.caption for s in scenes], seeds


def test_write_report_round_trip(tmp_path: Path):
    teacher, student, prompts, seeds = _images(3)
    report = _report(psnr=math.inf)
    paths = write_report(tmp_path / "out", report, teacher, student, prompts, seeds)
    data = json.loads(paths["json"].read_text())
    for key, subkeys in REQUIRED.items():
        assert key in data
        assert all(sub in data[key] for sub in subkeys)
    assert data["schema"] == 1 and data["speed"]["peak_rss_mb"] == 512.0
    # infinity is not JSON: written as null, with the flag telling "identical" from "missing"
    assert data["quality"]["psnr_vs_teacher"] is None
    assert data["quality"]["identical_to_teacher"] is True
    assert data["gates"]["psnr_min"]["value"] is None
    assert report["quality"]["psnr_vs_teacher"] == math.inf  # the caller's dict is untouched
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "report.html",
        "report.json",
        "report.md",
    ]

    md = paths["md"].read_text()
    assert "| layer | role | bits | err |" in md and "blocks.0.ff.net.2" in md
    assert "### 2. prune_depth (3.0 s)" in md and "identical" in md


def test_html_has_two_images_per_pair_inline(tmp_path: Path):
    teacher, student, prompts, seeds = _images(4)
    paths = write_report(tmp_path, _report(), teacher, student, prompts, seeds)
    html = paths["html"].read_text()
    assert html.count("<img") == 2 * len(prompts)
    assert len(re.findall(r'src="data:image/png;base64,', html)) == 2 * len(prompts)
    assert "image-rendering:pixelated" in html and "http" not in html.split("<body>")[1]
    for p in prompts:
        assert p in html
    assert "seed 3" in html and "checker" in html  # demo report: checker verdicts shown


def test_html_student_only_and_no_images(tmp_path: Path):
    _, student, prompts, _ = _images(2)
    html = write_report(tmp_path / "a", _report(acc=None), None, student, prompts)["html"]
    assert html.read_text().count("<img") == 2
    html = write_report(tmp_path / "b", _report())["html"]
    assert "<img" not in html.read_text()


@pytest.mark.parametrize(
    ("path", "message"),
    [
        (("gates",), "'gates'"),
        (("size", "bits_per_weight"), "'size.bits_per_weight'"),
        (("quality", "teacher_prompt_accuracy"), "'quality.teacher_prompt_accuracy'"),
        (("passes", 1, "seconds"), "'passes.1.seconds'"),
        (("gates", "psnr_min", "threshold"), "'gates.psnr_min.threshold'"),
    ],
)
def test_missing_key_is_named(tmp_path: Path, path: tuple, message: str):
    report = copy.deepcopy(_report())
    node = report
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    with pytest.raises(ValueError, match=re.escape(message)):
        write_report(tmp_path, report)
    assert not (tmp_path / "report.json").exists()


def test_image_count_mismatch_is_an_error(tmp_path: Path):
    teacher, student, prompts, _ = _images(3)
    with pytest.raises(ValueError, match="prompts"):
        write_report(tmp_path, _report(), teacher, student, prompts[:2])


def test_to_jsonable_and_summary_lines():
    data = to_jsonable({"a": (np.int64(3), np.float32(0.5)), "b": float("nan"), "c": Path("x")})
    assert data == {"a": [3, 0.5], "b": None, "c": "x"}
    lines = summary_lines(_report())
    assert 2 <= len(lines) <= 6
    text = "\n".join(lines)
    assert "4.50 bits/weight" in text and "31.20 dB" in text and "80.0%" in text
    assert "1.20x" in text and "all 1 passed" in text


def _write_run(root: Path, name: str, **kw: Any) -> Path:
    out = root / name
    write_report(out, _report(**kw))
    return out


def test_compare_table_plot_and_pareto(tmp_path: Path):
    a = _write_run(tmp_path, "run-w8", bits=8.5, psnr=38.0, acc=0.88)
    b = _write_run(tmp_path, "run-w4", bits=4.5, psnr=31.0, acc=0.80)
    c = _write_run(tmp_path, "run-bad", bits=6.0, psnr=29.0, acc=0.70)  # dominated by run-w4
    md = compare([a, b / "report.json", c], out_md=tmp_path / "cmp" / "compare.md")
    png = tmp_path / "cmp" / "compare.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "cmp" / "compare.md").read_text() == md
    rows = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ")}
    assert {"run-w8", "run-w4", "run-bad"} <= set(rows)
    assert rows["run-w8"].rstrip(" |").endswith("yes")
    assert rows["run-w4"].rstrip(" |").endswith("yes")
    assert not rows["run-bad"].rstrip(" |").endswith("yes")
    assert "88.0%" in rows["run-w8"] and "38.00 dB" in rows["run-w8"]
    assert "prompt accuracy" in md and "compare.png" in md


def test_compare_keeps_one_front_per_source_model_and_failed_gates_off_it(tmp_path: Path):
    """Outputs of different source models each get their own front (a model column says which);
    an output whose gate failed is shown as failed and never on the front; rows evaluated on
    different prompts are said not to be comparable."""
    def run(name, model, bits, acc, passed=True, seeds=(0, 1)):
        rep = _report(bits=bits, acc=acc)
        rep["model"] = {"path": model, "family": "pixart", "params": 1_234_567}
        rep["gates"] = {"prompt_accuracy_drop": {"value": 0.1, "threshold": 0.05,
                                                 "passed": passed}}
        rep["eval"] = {"prompts": ["a", "b"], "seeds": list(seeds), "steps": 20}
        out = tmp_path / name
        write_report(out, rep)
        return out

    outs = [run("a-w8", "model-a", 8.0, 0.9), run("a-w4", "model-a", 4.0, 0.8),
            run("b-w8", "model-b", 8.0, 0.5),  # dominated by both a-rows if models were mixed
            run("a-w2-failed", "model-a", 2.0, 0.95, passed=False),
            run("a-other-seeds", "model-a", 5.0, 0.1, seeds=(5, 6))]  # alone: own front
    md = compare(outs)
    rows = {line.split("|")[2].strip(): line for line in md.splitlines()
            if line.startswith("| ") and "model-" in line}
    front = {k for k, v in rows.items() if v.rstrip(" |").endswith("yes")}
    assert front == {"a-w8", "a-w4", "b-w8", "a-other-seeds"}  # b-w8: its own model's front
    assert "FAILED: prompt_accuracy_drop" in rows["a-w2-failed"]
    assert "passed (1)" in rows["a-w8"]
    assert "model-b" in rows["b-w8"] and "per source model" in md
    assert "not comparable" in md and "a-other-seeds" in md.split("not comparable")[1]


def test_compare_explicit_plot_psnr_metric(tmp_path: Path):
    a = _write_run(tmp_path, "x", bits=8.0, psnr=math.inf, acc=None)
    b = _write_run(tmp_path, "y", bits=3.0, psnr=25.0, acc=None)
    md = compare([a, b], plot=tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 1000
    assert "PSNR vs teacher" in md and "identical" in md


def test_compare_errors_for_missing_or_bad_reports(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no report"):
        compare([tmp_path / "empty"])
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "report.json").write_text("{not json")
    with pytest.raises(UserError, match="not a valid"):
        compare([bad])
    with pytest.raises(UserError, match="no report"):
        compare([tmp_path / "nowhere"])
