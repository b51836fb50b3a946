"""The vq pass: k-means, GPTVQ and VQ4DiT-style calibration, the VQLinear runtime, storage and
bits accounting, every family end to end with bit-equal reloads, and composition with ptq."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_pipelines import FAMILIES

import compress
from compress.errors import UserError
from compress.modules.vq_linear import VQLinear
from compress.quant import vq
from compress.quant.qtensor import sqnr_db
from compress.quant.vq_calib import SoftVQLinear, calibrate

ROOT = Path(__file__).resolve().parents[1]
TINY = ["calibration.num_prompts=1", "calibration.steps=2", "eval.num_prompts=2", "eval.steps=2",
        "eval.latency_repeats=1"]
FAST = ["passes.0.vq.iters=15", "passes.0.vq.calib_samples=4", "passes.0.vq.kmeans_iters=10",
        "passes.0.vq.finetune.iters=5"]


def _correlated_inputs(n: int, d_in: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-1, 1, d_in)[torch.randperm(d_in, generator=g)]
    mix = torch.eye(d_in) + 0.3 * torch.randn(d_in, d_in, generator=g) / d_in ** 0.5
    return (torch.randn(n, d_in, generator=g) * scales) @ mix


# ------------------------------------------------------------------------------- the maths


def test_kmeans_finds_separated_clusters_and_is_deterministic():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(16, 4, generator=g) * 10
    x = centres.repeat(50, 1) + 0.01 * torch.randn(800, 4, generator=g)
    c, a = vq.kmeans(x, 16, iters=50, seed=1)
    assert sqnr_db(x, c[a]) > 40  # every point near its own centre
    c2, a2 = vq.kmeans(x, 16, iters=50, seed=1)
    assert torch.equal(c, c2) and torch.equal(a, a2)


def test_importance_weighting_helps_where_inputs_are_large():
    torch.manual_seed(0)
    w = torch.randn(64, 128) * 0.05
    x = _correlated_inputs(2048, 128)
    h = (x * x).mean(0)
    outs = {}
    for name, imp in (("plain", None), ("weighted", h)):
        books, idx = vq.init_codebooks(w, 4, 32, None, imp, 30, 0)
        outs[name] = sqnr_db(x @ w.T, x @ vq.decode(books, idx, None).T)
    assert outs["weighted"] > outs["plain"] + 1.0


def test_gptvq_beats_nearest_assignment_on_correlated_inputs():
    torch.manual_seed(0)
    w = torch.randn(64, 128) * 0.05
    x = _correlated_inputs(4096, 128)
    hess = x.T @ x / x.shape[0]
    books, idx = vq.init_codebooks(w, 2, 16, None, torch.diagonal(hess), 30, 0)
    near = sqnr_db(x @ w.T, x @ vq.decode(books, idx, None).T)
    books_g, idx_g = vq.gptvq(w, hess, 2, 16, None, 30, 0)
    hess_aware = sqnr_db(x @ w.T, x @ vq.decode(books_g, idx_g, None).T)
    assert hess_aware > near + 0.5


def test_soft_assignment_calibration_lowers_output_error_and_hardens():
    torch.manual_seed(0)
    w = torch.randn(48, 64) * 0.05
    x = _correlated_inputs(512, 64)
    books, _ = vq.init_codebooks(w, 4, 16, None, None, 30, 0)
    cand, dist = vq.assign_nearest(w, books, None, None, 2)
    m = SoftVQLinear(books, cand, dist, None, None)
    m.hard = True
    before = sqnr_db(x @ w.T, m(x).detach())
    m.hard = False
    with torch.enable_grad():
        out = calibrate([m], lambda i: m(x), [[x @ w.T]], 300, 1e-3, 5e-2, 1.0, 0.99, 0)
    assert m.hard and out["frozen"] > 0.9
    after = sqnr_db(x @ w.T, m(x).detach())
    assert after > before + 1.0
    # hard weights use exactly one candidate codeword of the (fp16-rounded) codebook
    assert torch.equal(m.weight(), vq.decode(m.books.detach(), m.choice(), None))
    assert torch.equal(m.books.detach(), m.books.detach().half().float())


# ---------------------------------------------------------------------------- the runtime


@pytest.mark.parametrize("dim,k,rows", [(4, 256, None), (2, 64, None), (4, 16, 8)])
def test_vqlinear_stores_compactly_and_computes_the_decoded_weight(dim, k, rows, monkeypatch):
    torch.manual_seed(0)
    out_f, in_f = 24, 32
    books = torch.randn(vq.row_groups(out_f, rows), k, dim)
    idx = torch.randint(0, k, (out_f, in_f // dim))
    bias = torch.randn(out_f)
    m = VQLinear.from_assignment(books, idx, bias, rows)
    w = vq.decode(books.half().float(), idx, rows)
    assert torch.equal(m.dequantized_weight(), w)
    x = torch.randn(5, in_f)
    assert torch.allclose(m(x), F.linear(x, w, bias), atol=1e-5)
    # indices take log2(k) bits each (bit-packed below 8), codebooks 16 bits per entry
    nv, b = in_f // dim, vq.index_bits(k)
    assert m.indices.numel() == out_f * (nv if b == 8 else -(-nv // 8) * b)
    assert m.codebooks.dtype == torch.float16
    # the tiled forward (a few rows at a time) gives the one-tile result
    whole = m(x)
    monkeypatch.setattr("compress.modules.vq_linear.TILE", in_f * 5)
    assert torch.allclose(m(x), whole, atol=1e-6)
    # no float copy of the weight is kept as a buffer, parameter or attribute
    tensors = list(m.buffers()) + list(m.parameters()) + [
        v for v in vars(m).values() if isinstance(v, torch.Tensor)]
    assert not any(t.is_floating_point() and t.numel() >= out_f * in_f // 2 and
                   tuple(t.shape) != tuple(m.codebooks.shape) for t in tensors)


def test_layer_bits_count_indices_and_codebooks():
    from compress.passes.vq import Config, layer_bits

    cfg2, cfg3 = Config(bits=2), Config(bits=3)
    # a 1152 x 4608 layer: 2 bits + 256*4*16 / (1152*4608), 3 bits + 64*2*16 / ...
    assert layer_bits(1152, 4608, cfg2) == pytest.approx(2 + 256 * 4 * 16 / (1152 * 4608))
    assert layer_bits(1152, 4608, cfg3) == pytest.approx(3 + 64 * 2 * 16 / (1152 * 4608))
    m = VQLinear(4608, 1152, False, 2, 64)
    stored = sum(t.numel() * t.element_size() for t in m.state_dict().values()) * 8
    assert stored == pytest.approx(layer_bits(1152, 4608, cfg3) * 1152 * 4608)


# -------------------------------------------------------------------- end to end, families


@pytest.mark.parametrize("family", FAMILIES)
def test_vq_2bit_every_family_reloads_bit_equal(family, tiny_pipeline_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("DIT_COMPRESS_CACHE", str(tmp_path / "cache"))
    from compress.models import load_model

    src = tiny_pipeline_dir(family)
    out = tmp_path / "out"
    report = compress.run_recipe(ROOT / "recipes" / "vq-2bit.yaml", model=str(src), out=out,
                                 overrides=TINY + FAST)
    p = report["passes"][0]
    assert p["layers_quantized"] > 0 and p["method"] == "vq4dit"
    assert p["blocks"] and all(b["seconds"] >= 0 for b in p["blocks"])
    # the reported bits of the VQ layers are their stored bytes
    tr = compress.load_pipeline(out).transformer
    vql = [m for m in tr.modules() if isinstance(m, VQLinear)]
    assert len(vql) == p["layers_quantized"]
    stored = sum(t.numel() * t.element_size() for m in vql
                 for k, t in m.state_dict().items() if k != "bias")  # weights: not the bias
    weights = sum(m.in_features * m.out_features for m in vql)
    assert stored * 8 / weights == pytest.approx(p["bits_per_weight_vq_layers"], rel=1e-9)
    rep = json.loads((out / "report.json").read_text())
    assert rep["size"]["bytes"] == report["size"]["bytes"]
    pipe = compress.load_pipeline(out)
    ev = rep["eval"]
    images = load_model(str(src)).adapter.generate(pipe, ev["prompts"], ev["seeds"], ev["steps"],
                                                   ev["guidance"], ev["resolution"])
    assert np.array_equal(images, report["_student_images"])


@pytest.mark.parametrize("method,init", [("gptvq", "gptvq"), ("kmeans", "kmeans"),
                                         ("vq4dit", "kmeans")])
def test_other_methods_and_3bit_run(method, init, tiny_pipeline_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("DIT_COMPRESS_CACHE", str(tmp_path / "cache"))
    report = compress.run_recipe(ROOT / "recipes" / "vq-3bit.yaml",
                                 model=str(tiny_pipeline_dir("pixart")), out=None,
                                 overrides=TINY + FAST + [f"passes.0.vq.method={method}",
                                                          f"passes.0.vq.init={init}"])
    p = report["passes"][0]
    assert p["dim"] == 2 and p["codebook_size"] == 64
    assert p["layers"] and all(r["weight_sqnr_db"] > 5 for r in p["layers"])


def test_zero_data_recipe_uses_random_prompts(tiny_pipeline_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("DIT_COMPRESS_CACHE", str(tmp_path / "cache"))
    from compress.calib.prompts import random_prompts
    from compress.models import load_model

    pipe = load_model(str(tiny_pipeline_dir("pixart"))).pipeline
    a, b = random_prompts(pipe, 4, 7), random_prompts(pipe, 4, 7)
    assert a == b and len(set(a)) == 4 and random_prompts(pipe, 4, 8) != a
    report = compress.run_recipe(ROOT / "recipes" / "vq-2bit-zero-data.yaml",
                                 model=str(tiny_pipeline_dir("pixart")), out=None,
                                 overrides=TINY + FAST)
    assert report["recipe"]["calibration"]["prompts"] == "random"
    assert report["quality"]["psnr_vs_teacher"] is not None


def test_vq_and_ptq_in_one_recipe_take_disjoint_layers(tiny_pipeline_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("DIT_COMPRESS_CACHE", str(tmp_path / "cache"))
    src = str(tiny_pipeline_dir("pixart"))
    out = tmp_path / "o"
    report = compress.run_recipe(ROOT / "recipes" / "vq2-ffn-w8a8-attn.yaml", model=src, out=out,
                                 overrides=TINY + FAST)
    vq_layers = {r["layer"] for r in report["passes"][0]["layers"]}
    ptq_layers = {r["layer"] for r in report["passes"][1]["layers"]}
    assert vq_layers and ptq_layers and not vq_layers & ptq_layers
    assert {r["role"] for r in report["passes"][0]["layers"]} == {"ff_in", "ff_out"}
    tr = compress.load_pipeline(out).transformer
    assert all(isinstance(tr.get_submodule(n), VQLinear) for n in vq_layers)
    # overlapping selections are refused before any work
    calls = []
    monkeypatch.setattr("compress.runner.capture_calibration", lambda *a, **k: calls.append(1))
    bad = {"name": "x", "passes": [{"vq": {"include": ["ff_in"]}}, {"ptq": {}}]}
    with pytest.raises(UserError, match="already quantises"):
        compress.run_recipe(bad, model=src, out=tmp_path / "never")
    assert not calls and not (tmp_path / "never").exists()


def test_vq_config_rules():
    from compress.passes.vq import Config

    with pytest.raises(ValueError):
        Config(dim=4)  # without codebook_size
    with pytest.raises(ValueError):
        Config(bits=4)
    assert Config(dim=8, codebook_size=256).shape() == (8, 256)
    with pytest.raises(ValueError, match="contradicts"):
        Config(method="kmeans", init="gptvq")
    with pytest.raises(ValueError):
        Config.model_validate({"include": ["re:("]})
