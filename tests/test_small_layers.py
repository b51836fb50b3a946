"""Small W8A8 layers run their weights dequantised when that is faster (issue 16): the choice is
made by timing at the first call, forced by DIT_COMPRESS_W8A8_DENSE, kept per process by shape,
and counted in the report; the dense form is the float matmul with the stored int8 weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import compress
from compress.modules import w8a8_dense
from compress.modules.w8a8 import W8A8Linear


def _layer(smooth: bool = True) -> W8A8Linear:
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    return W8A8Linear.from_linear(lin, smooth=torch.rand(64) + 0.5 if smooth else None)


def test_dense_form_is_the_float_matmul_of_the_stored_weights(monkeypatch):
    monkeypatch.setenv("DIT_COMPRESS_W8A8_DENSE", "always")
    m = _layer()
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        y = m(x)
        want = x @ m.dequantized_weight().T + m.bias
    assert m._dense is True
    assert torch.allclose(y, want, atol=1e-5)
    # closer to the unquantised layer than the int8 form (no activation rounding)
    monkeypatch.setenv("DIT_COMPRESS_W8A8_DENSE", "never")
    q = _layer()
    with torch.no_grad():
        yq = q(x)
    assert q._dense is False and not torch.allclose(yq, y, atol=1e-6)


def test_auto_choice_is_timed_once_per_shape_and_reused(monkeypatch):
    monkeypatch.setenv("DIT_COMPRESS_W8A8_DENSE", "auto")
    monkeypatch.setattr(w8a8_dense, "_DECISIONS", {})
    calls = []
    real = w8a8_dense.best_seconds
    monkeypatch.setattr(w8a8_dense, "best_seconds", lambda f, repeats=3: calls.append(1) or real(f, repeats))
    a, b = _layer(), _layer()
    x = torch.randn(4, 64)
    with torch.no_grad():
        a(x)
        b(x)
    assert len(calls) == 2  # two forms timed for the first layer, the second reuses the choice
    assert a._dense == b._dense is not None
    w8a8_dense._DECISIONS.clear()
    with torch.no_grad():
        a(torch.randn(40, 64))  # another token count (a new resolution): decided anew
        a(x)  # back to the first: this layer's own decision, not timed again
    assert len(calls) == 4
    assert set(a.__dict__["_dense_by"]) == {(4, torch.float32, "cpu"), (40, torch.float32, "cpu")}
    big = W8A8Linear.from_linear(nn.Linear(4096, 4096))
    with torch.no_grad():
        big(torch.randn(8, 4096))
    assert big._dense is False and len(calls) == 4  # over MAX_MACS: int8, not timed


def test_report_counts_dense_layers(tiny_pipeline_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("DIT_COMPRESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("DIT_COMPRESS_W8A8_DENSE", "always")
    rep = compress.run_recipe({"name": "t", "calibration": {"num_prompts": 2, "steps": 3},
                               "eval": {"num_prompts": 2, "steps": 3, "latency": True,
                                        "latency_repeats": 1},
                               "passes": [{"ptq": {"weights": {"bits": 8},
                                                   "activations": {"bits": 8}}}]},
                              str(tiny_pipeline_dir("pixart")), tmp_path / "o")
    d = rep["speed"]["w8a8_dense"]
    assert d["layers"] == d["of"] > 0
    assert rep["quality"]["psnr_vs_teacher"] > 40


def test_small_weight_only_layers_reuse_their_weight_bit_equal(monkeypatch):
    from compress.modules import weight_cache
    from compress.modules.qlinear import QLinear

    monkeypatch.setenv("DIT_COMPRESS_PACKED_LINEAR", "off")  # plain F.linear: bit-equal
    weight_cache.reset_packed_choice()
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    q = QLinear.from_linear(lin, 4, 16)
    x = torch.randn(5, 64)
    with torch.no_grad():
        y1 = q(x)
        hit = q.__dict__["_weight_cache"][3]
        y2 = q(x)
        assert q.__dict__["_weight_cache"][3] is hit and torch.equal(y1, y2)
        assert torch.equal(y1, torch.nn.functional.linear(x, q.dequantized_weight(), q.bias))
        q.scale.mul_(2)  # the buffers change in place: the weight is rebuilt
        y3 = q(x)
    assert q.__dict__["_weight_cache"][3] is not hit and not torch.equal(y3, y1)
    with torch.no_grad():
        q.scale.data = q.scale.data / 2  # the storage swapped (as an offloading hook may do)
        assert torch.equal(q(x), y1)
    weight_cache.reset_packed_choice()
    monkeypatch.setattr(weight_cache, "MAX_ELEMENTS", 10)  # a large layer keeps no copy
    big = QLinear.from_linear(lin, 8)
    with torch.no_grad():
        big(x)
    assert "_weight_cache" not in big.__dict__


@pytest.mark.parametrize("family", ["pixart", "sana", "flux"])  # packed; depthwise conv; offset
def test_small_moe_runs_dense_with_the_same_values_and_counts(family, tiny_pipeline_dir, tmp_path,
                                                               monkeypatch):
    import sys

    from compress.modules import moe

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from tiny_pipelines import first_call_inputs

    monkeypatch.setenv("DIT_COMPRESS_CACHE", str(tmp_path / "cache"))
    compress.run_recipe({"name": "t", "calibration": {"num_prompts": 2, "steps": 3},
                         "eval": {"enabled": False, "latency": False},
                         "passes": [{"to_moe": {"experts": 4, "top_k": 1, "shared": 0.25}}]},
                        str(tiny_pipeline_dir(family)), tmp_path / "o")
    args, kw = first_call_inputs(family)
    outs, loads = {}, {}
    for mode in ("never", "always"):
        monkeypatch.setenv("DIT_COMPRESS_MOE_DENSE", mode)
        tr = compress.load_pipeline(tmp_path / "o").transformer
        moe.collect(tr)
        with torch.no_grad():
            outs[mode] = tr(*args, **kw)[0]
        loads[mode] = [r.load.clone() for _, r in moe.routes(tr)]
        assert {r.mode for _, r in moe.routes(tr)} == {"sparse" if mode == "never" else "dense"}
    assert torch.allclose(outs["never"], outs["always"], atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(loads["never"], loads["always"], strict=True))


def test_packed_gemm_for_kept_weights_matches_f_linear_and_keeps_autograd(monkeypatch):
    from compress.modules import weight_cache
    from compress.modules.int4 import Int4Linear
    from compress.modules.qlinear import QLinear
    from compress.modules.w8a8 import W8A8Linear

    if not weight_cache._packed_ops_available():
        pytest.skip("this torch build has no oneDNN packed linear")
    monkeypatch.setenv("DIT_COMPRESS_PACKED_LINEAR", "on")
    weight_cache.reset_packed_choice()
    try:
        torch.manual_seed(0)
        lin = nn.Linear(96, 40)
        x = torch.randn(3, 7, 96)
        for q in (QLinear.from_linear(lin, 8), Int4Linear.from_linear(lin, 32)):
            ref = torch.nn.functional.linear(x, q.dequantized_weight(), q.bias)
            with torch.no_grad():
                y = q(x)
                assert q.__dict__["_weight_cache"][1] is True  # the packed form is what is kept
            assert y.shape == ref.shape
            assert (y - ref).abs().max() <= 1e-5 * ref.abs().max()
            # with autograd on, the plain path runs (no gradient through the packed op)
            xg = x.clone().requires_grad_(True)
            q(xg).sum().backward()
            assert xg.grad is not None and q.__dict__["_weight_cache"][1] is False
        w = W8A8Linear.from_linear(lin)
        monkeypatch.setenv("DIT_COMPRESS_W8A8_DENSE", "always")
        with torch.no_grad():
            y = w(x)
        ref = torch.nn.functional.linear(x, w.dequantized_weight(), w.bias)
        assert w._dense_w[0][1] is True
        assert (y - ref).abs().max() <= 1e-5 * ref.abs().max()
        monkeypatch.setenv("DIT_COMPRESS_PACKED_LINEAR", "off")
        weight_cache.reset_packed_choice()
        with torch.no_grad():
            assert torch.equal(w(x), ref)  # off: F.linear on the same weight, bit-equal
    finally:
        weight_cache.reset_packed_choice()


@pytest.mark.parametrize("forced", ["on", "off"])
def test_report_names_the_kept_weight_gemm(forced, tiny_pipeline_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("DIT_COMPRESS_CACHE", str(tmp_path / "cache"))
    """Part of a compressed output's speed can be the packed GEMM its kept weights chose, not
    its bits: the report says which kernel ran, and the summary line says so when packed."""
    import compress
    from compress.modules import weight_cache
    from compress.report.markdown import summary_lines

    if forced == "on" and not weight_cache._packed_ops_available():
        pytest.skip("this torch build has no oneDNN packed linear")
    monkeypatch.setenv("DIT_COMPRESS_PACKED_LINEAR", forced)
    weight_cache.reset_packed_choice()
    try:
        rep = compress.run_recipe({"name": "t", "calibration": {"num_prompts": 2, "steps": 3},
                                   "eval": {"num_prompts": 2, "steps": 3, "latency": True,
                                            "latency_repeats": 1},
                                   "passes": [{"ptq": {"weights": {"bits": 8}}}]},
                                  str(tiny_pipeline_dir("pixart")), tmp_path / "o")
    finally:
        weight_cache.reset_packed_choice()
    want = "onednn_packed" if forced == "on" else "f_linear"
    assert rep["speed"]["kept_weight_gemm"] == {"float32": want}
    text = " ".join(summary_lines(rep))
    assert ("packed GEMM" in text) == (forced == "on")
