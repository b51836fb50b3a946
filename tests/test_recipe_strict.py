"""Recipes are read strictly: every bad value of the hostile-user list is one UserError naming
the key, before any model is touched; files and --set values that are not clean YAML too."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from compress.errors import UserError
from compress.recipe import MAX_DEPTH, load_recipe, parse_yaml, validate

ROOT = Path(__file__).resolve().parents[1]
BASE = yaml.safe_load((ROOT / "recipes" / "w4a8-mp.yaml").read_text())
NAN, INF = float("nan"), float("inf")


def _with(path: str, value):
    """BASE with the dotted key set to value (lists by index); '!del' removes it."""
    r = copy.deepcopy(BASE)
    *parents, last = path.split(".")
    node = r
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
    if isinstance(node, list):
        node[int(last)] = value
    elif value == "!del":
        node.pop(last, None)
    else:
        node[last] = value
    return r


MP = "passes.0.ptq.mixed_precision"
BAD = {
    "empty passes": ("passes", []),
    "passes null": ("passes", None),
    "pass as bare string": ("passes.0", "ptq"),
    "pass config a list": ("passes.0.ptq", [1]),
    "guidance nan": ("calibration.guidance", NAN),
    "guidance inf": ("eval.guidance", INF),
    "guidance negative": ("calibration.guidance", -1.0),
    "alpha -5": ("passes.0.ptq.smoothing.alpha", -5),
    "alpha 7": ("passes.0.ptq.smoothing.alpha", 7),
    "alpha nan": ("passes.0.ptq.smoothing.alpha", NAN),
    "damp inf": ("passes.0.ptq.gptq.damp", INF),
    "avg_bits inf": (f"{MP}.avg_bits", INF),
    "avg_bits 100": (f"{MP}.avg_bits", 100),
    "avg_bits below the smallest candidate": (f"{MP}.avg_bits", 3.0),
    "empty candidates": (f"{MP}.candidates", []),
    "duplicate candidates": (f"{MP}.candidates", [4, 4, 8]),
    "empty metrics": (f"{MP}.metrics", []),
    "capture_steps -1": ("calibration.capture_steps", [-1]),
    "capture_steps 1000": ("calibration.capture_steps", [1000]),
    "capture_steps empty": ("calibration.capture_steps", []),
    "capture_steps duplicate": ("calibration.capture_steps", [1, 1]),
    "include empty": ("passes.0.ptq.include", []),
    "name empty": ("name", ""),
    "name blank": ("name", "   "),
    "resolution 9": ("calibration.resolution", 9),
    "steps 10^6": ("calibration.steps", 10**6),
    "repeats 10^9": ("eval.latency_repeats", 10**9),
    "group size 10^12": ("passes.0.ptq.weights.group_size", 10**12),
    "calib samples 10^7": ("passes.0.ptq.calib_samples", 10**7),
    "num_prompts true": ("eval.num_prompts", True),
    "bits 8.0": ("passes.0.ptq.weights.bits", 8.0),
    "steps as text": ("calibration.steps", "20"),
    "gate nan": ("gates.psnr_vs_teacher", NAN),
    "gate inf": ("gates.psnr_vs_teacher", ">= inf"),
    "gate on no figure": ("gates.psnr", ">= 30"),
    "bad regex": ("passes.0.ptq.exclude", ["re:("]),
    "empty selector": ("passes.0.ptq.include", [""]),
    "seed 2**64": ("calibration.seed", 2**64),
    "seed negative": ("eval.seed", -1),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_values_are_one_user_error_naming_the_key(case):
    path, value = BAD[case]
    with pytest.raises(UserError) as err:
        validate(_with(path, value), "r.yaml")
    msg = str(err.value)
    assert msg.startswith("r.yaml") and "\n" not in msg
    assert path.split(".")[-1] in msg or path.split(".")[0] in msg, msg


def test_the_base_recipe_itself_is_valid():
    validate(copy.deepcopy(BASE), "r.yaml")
    lowrank = yaml.safe_load((ROOT / "recipes" / "w4a4-lowrank.yaml").read_text())
    lowrank["passes"][0]["ptq"]["lowrank"]["rank"] = 10**6
    with pytest.raises(UserError, match="rank"):
        validate(lowrank, "r.yaml")


def test_capture_steps_within_the_given_steps():
    r = _with("calibration.steps", 20)
    r["calibration"]["capture_steps"] = [19]
    validate(r, "r.yaml")
    r["calibration"]["capture_steps"] = [20]
    with pytest.raises(UserError, match=r"capture_steps \[20\].*0 to steps - 1 \(19\)"):
        validate(r, "r.yaml")


def _file(tmp_path, data: bytes) -> Path:
    p = tmp_path / "r.yaml"
    p.write_bytes(data)
    return p


@pytest.mark.parametrize("data,match", [
    (b"\x00\x01\x02binary", "binary"),
    ("name: caf\u00e9\n".encode("latin-1"), "not UTF-8"),
    (b"name: a\nname: b\npasses: [{ptq: {}}]\n", "duplicate key 'name' .line 2"),
    (b"name: a\npasses: [{ptq: {weights: {bits: 4, bits: 8}}}]\n", "duplicate key 'bits'"),
    (b"[" * 500 + b"]" * 500, "nested"),
    (b"name: a\n" + b"#" * (1 << 20), "larger than"),
    (b"name: [\n", "not valid YAML"),
])
def test_recipe_files_are_read_strictly(tmp_path, data, match):
    with pytest.raises(UserError, match=match) as err:
        load_recipe(_file(tmp_path, data))
    assert "\n" not in str(err.value) and "r.yaml" in str(err.value)


@pytest.mark.parametrize("ov,match", [
    ("eval.num_prompts=[", r"--set eval.num_prompts.*not valid YAML"),
    ("gates.psnr_vs_teacher=>= 30", r"--set gates.psnr_vs_teacher"),
    ("passes=", "non-empty list"),
    ("eval..seed=3", "dotted path"),
])
def test_set_values_are_read_strictly(ov, match):
    with pytest.raises(UserError, match=match) as err:
        load_recipe(ROOT / "recipes" / "w8.yaml", [ov])
    assert "\n" not in str(err.value)


def test_depth_limit_is_exact():
    ok = "a: " + "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1)
    assert parse_yaml(ok, "x") is not None
    with pytest.raises(UserError, match="nested"):
        parse_yaml("a: " + "[" * MAX_DEPTH + "]" * MAX_DEPTH, "x")


@pytest.mark.parametrize("key,sel,match", [
    ("include", "attn_qvk", "did you mean 'attn_qkv'"),
    ("exclude", "re:nothing\\..*", "matches no Linear"),
    ("include", "blocks.0.fcc", "did you mean 'blocks.0.fc'"),
])
def test_selectors_naming_nothing_are_refused_before_calibration(tmp_path, key, sel, match):
    import torch
    from torch import nn

    import compress

    net = nn.Sequential()
    net.add_module("blocks", nn.ModuleList([nn.Sequential() for _ in range(2)]))
    for b in net.blocks:
        b.add_module("fc", nn.Linear(8, 8))
    calls = []
    recipe = {"name": "s", "passes": [{"ptq": {key: [sel]}}]}
    with pytest.raises(UserError, match=match):
        compress.run_recipe(recipe, model=net, calibrate_fn=lambda m: calls.append(m(
            torch.zeros(1, 8))), out=tmp_path / "o")
    assert not calls and not (tmp_path / "o").exists()


def test_unreachable_budget_on_a_pipeline_is_refused_before_calibration(tiny_pipeline_dir,
                                                                         tmp_path, monkeypatch):
    import importlib

    import compress

    capture = importlib.import_module("compress.calib.capture")

    def no_capture(*a, **k):
        raise AssertionError("calibration started")

    monkeypatch.setattr(capture, "capture", no_capture)
    ov = ["passes.0.ptq.mixed_precision.avg_bits=4.0",
          "passes.0.ptq.mixed_precision.if_unreachable=refuse"]
    with pytest.raises(UserError, match=r"cheapest allocation \(4\.\d+ bits"):
        compress.run_recipe(ROOT / "recipes" / "w4a8-mp.yaml", model=tiny_pipeline_dir("pixart"),
                            out=tmp_path / "o", overrides=ov)
    assert not (tmp_path / "o").exists()


def test_gate_removed_by_set_null_and_prompt_sources_checked(tmp_path):
    r = load_recipe(ROOT / "recipes" / "w8a8.yaml", ["gates.psnr_vs_teacher=null"])
    assert "psnr_vs_teacher" not in r.gates and "prompt_accuracy_drop" in r.gates
    from compress.calib.prompts import load_prompts

    with pytest.raises(UserError, match="not a regular file"):
        load_prompts("/dev/zero")


def test_unwritable_out_is_refused_before_any_work(tmp_path, monkeypatch):
    import errno

    from compress.io import save

    def read_only(*a, **k):  # what a read-only file system answers (root ignores chmod)
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(save.tempfile, "mkstemp", read_only)
    with pytest.raises(UserError, match=r"cannot write in .*Read-only file system"):
        save.check_out_dir(tmp_path / "deeper" / "o", False, None)


def test_every_cli_option_has_help_text():
    import argparse

    from compress.cli import _parser

    ap = _parser()
    subs = next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction))
    lacking = [f"{name} {'/'.join(a.option_strings) or a.dest}"
               for name, p in subs.choices.items() for a in p._actions
               if not isinstance(a, argparse._HelpAction) and not a.help]
    assert not lacking, lacking
