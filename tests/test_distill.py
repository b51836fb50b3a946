"""distill: it brings a pruned model closer to the original; two processes under torchrun train
the same model as one at the same global batch; a run killed mid-way and resumed ends where an
uninterrupted one does."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import compress

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
JOB = str(Path(__file__).with_name("distill_job.py"))


def _shapedit(depth: int = 4):
    from compress.demo.shapedit import ShapeDiT

    torch.manual_seed(0)
    return ShapeDiT(width=64, depth=depth, heads=2).eval()


def _calibrate(mod, n=4):
    from compress.demo.shapedit import sample_seeds

    for i in range(0, n, 4):
        sample_seeds(mod, [11 + j for j in range(i, min(i + 4, n))], steps=4)


def _error(a, b):
    return float((a - b).pow(2).mean() / b.pow(2).mean())


@pytest.mark.parametrize("mode", ["kd", "intervals"])
def test_distill_recovers_a_pruned_module(mode):
    from compress.demo.shapedit import sample_seeds

    m = _shapedit()
    method = "intervals" if mode == "intervals" else "last"
    prune = {"prune_depth": {"method": method, "remove": 2}}
    got = {}
    for steps in (0, 60):
        passes = [prune] + ([{"distill": {"mode": mode, "steps": steps, "batch": 4, "lr": 0.001,
                                          "warmup": 5, "checkpoint_every": 0,
                                          "data": {"num_prompts": 4, "seeds_per_prompt": 2}}}]
                            if steps else [])
        rep = compress.run_recipe({"name": "k", "passes": passes, "eval": {"latency": False}}, m,
                                  calibrate_fn=_calibrate, sample_fn=lambda mod, seeds:
                                  sample_seeds(mod, seeds, steps=4), out=None)
        got[steps] = rep
    assert got[60]["quality"]["psnr_vs_teacher"] > got[0]["quality"]["psnr_vs_teacher"] + 1.0
    d = got[60]["passes"][1]
    assert d["samples"] == 2 * 4  # calibrate_fn takes n: 8 seeds, 4 a call, 4 steps
    assert d["loss_last"] < 0.5 * d["loss_first"]
    assert len(d["loss_curve"]) == 60
    from compress.report.html import render_html

    page = render_html({k: v for k, v in got[60].items() if not k.startswith("_")})
    assert 'alt="loss curve"' in page  # the curve is drawn in report.html


def _weights(out: Path) -> dict[str, torch.Tensor]:
    sd = {}
    for f in sorted((out / "transformer").glob("*.safetensors")):
        sd.update(load_file(str(f)))
    return sd


def _job(args, **kw):
    return subprocess.run([sys.executable, JOB, *map(str, args)], check=True,
                          capture_output=True, text=True, timeout=600, **kw)


@pytest.mark.parametrize("prune", ["last", "learnable", "width"])
def test_two_processes_train_the_same_model_as_one(prune, tiny_pipeline_dir, tmp_path):
    """Learned pruning choices (block groups, width gates) included: their noise is drawn per
    global step and sample, so both processes draw what one process draws."""
    src = tiny_pipeline_dir("pixart")
    cache = tmp_path / "cache"
    args = ["--steps", 6, "--batch", 4, "--every", 0, "--prune", prune]
    _job([src, tmp_path / "one", cache, *args])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           JOB, src, tmp_path / "two", cache, *args]
    subprocess.run(list(map(str, cmd)), check=True, capture_output=True, text=True, timeout=600)
    one, two = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    from compress.models import load_model

    base = load_model(str(src)).transformer.state_dict()
    # Same batches, gradients summed in another order (per process, then across): fp32
    # rounding, amplified a little by Adam's normalisation over 6 steps. A wrong split (each
    # process on the full batch, or no all-reduce) moves weights by a sizeable part of the update.
    moved = sum(float((one[k] - base[k]).pow(2).sum()) for k in one  # layers of both shapes
                if k in base and one[k].shape == base[k].shape)
    diff = sum(float((one[k] - two[k]).pow(2).sum()) for k in one)
    assert moved > 0
    assert diff <= 1e-6 * moved, (diff, moved)
    import json

    r1, r2 = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("one", "two"))
    assert r2["passes"][1]["processes"] == 2
    key = "removed" if prune != "width" else "kept"
    assert r1["passes"][0][key] == r2["passes"][0][key]
    if prune != "last":
        a, b = r1["passes"][0]["learnable"], r2["passes"][0]["learnable"]
        assert b["processes"] == 2
        assert [v for _, v in a["loss_curve"]] == pytest.approx([v for _, v in b["loss_curve"]],
                                                                rel=1e-4)


def test_killed_run_resumes_to_the_same_result(tiny_pipeline_dir, tmp_path):
    src = tiny_pipeline_dir("pixart")
    cache = tmp_path / "cache"
    steps = ["--steps", 400, "--batch", 2, "--every", 20]
    _job([src, tmp_path / "full", tmp_path / "cache-full", *steps])
    assert not list((tmp_path / "cache-full" / "train").glob("*/*"))  # removed once written
    proc = subprocess.Popen([sys.executable, JOB, *map(str, [src, tmp_path / "cut", cache, *steps])],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if list((cache / "train").glob("*/pass1-distill/last/state.json")):
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (tmp_path / "cut").exists()  # nothing half-written
    _job([src, tmp_path / "cut", cache, *steps, "--resume"])
    full, cut = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    assert all(torch.equal(full[k], cut[k]) for k in full)
    import json

    rep = json.loads((tmp_path / "cut" / "report.json").read_text())
    assert 0 < rep["passes"][1]["resumed_from_step"] < 400
