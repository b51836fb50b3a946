"""Attention's matmul form (compress/modules/attention.py): the same values as torch's fused
kernel, taken only inside an enabled module's forward (this thread), only where it computes the
same thing, by timing per shape or as forced, and named in the report."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compress.modules import attention


@pytest.fixture(autouse=True)
def _fresh_choices():
    attention.reset_choices()
    yield
    attention.reset_choices()


def _qkv(dtype, b=2, h=3, n=10, m=7, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, s, d, generator=g).to(dtype) for s in (n, m, m)]


@pytest.mark.parametrize("mask_shape", [None, (2, 1, 1, 7), (2, 3, 10, 7), (1, 1, 10, 7)])
def test_matmul_form_equals_the_fused_kernel(mask_shape):
    q, k, v = _qkv(torch.float32)
    mask = None if mask_shape is None else torch.randn(mask_shape) * 3
    ref = attention._TORCH_SDPA(q, k, v, attn_mask=mask)
    got = attention.matmul_attention(q, k, v, mask)
    assert (got - ref).abs().max() < 1e-5
    # the fused kernel's layout: the reshape that follows is free
    assert got.transpose(1, 2).is_contiguous()
    # an explicit scale, and chunks of one head
    old = attention.CHUNK_BYTES
    attention.CHUNK_BYTES = 1
    try:
        got1 = attention.matmul_attention(q, k, v, mask, scale=0.3)
    finally:
        attention.CHUNK_BYTES = old
    assert (got1 - attention._TORCH_SDPA(q, k, v, attn_mask=mask, scale=0.3)).abs().max() < 1e-5


def test_bf16_matmul_form_is_close():
    q, k, v = _qkv(torch.bfloat16, n=64, m=64, d=32)
    ref = attention._TORCH_SDPA(q, k, v).float()
    got = attention.matmul_attention(q, k, v).float()
    # the scores are rounded to bf16 before the softmax: a few bf16 steps at most
    assert (got - ref).abs().max() < 0.05
    assert 10 * torch.log10(ref.pow(2).mean() / (got - ref).pow(2).mean()) > 30  # SQNR in dB


class _Attn(nn.Module):
    def forward(self, q, k, v, mask=None):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _spy(monkeypatch) -> list:
    calls: list = []
    real = attention.matmul_attention

    def spy(*a, **kw):
        calls.append(a[0].shape)
        return real(*a, **kw)

    monkeypatch.setattr(attention, "matmul_attention", spy)
    return calls


def test_only_inside_an_enabled_module_and_this_thread(monkeypatch):
    monkeypatch.setenv("DIT_COMPRESS_ATTENTION", "matmul")
    calls = _spy(monkeypatch)
    mod, other = attention.enable(_Attn()), _Attn()
    q, k, v = _qkv(torch.float32)
    with torch.no_grad():
        ref = other(q, k, v)  # F is replaced now, but not enabled here: torch's own
        assert calls == []
        assert torch.equal(F.scaled_dot_product_attention(q, k, v), ref)
        assert calls == []
        out = mod(q, k, v)
        assert len(calls) == 1 and (out - ref).abs().max() < 1e-5
        seen = []
        # another thread calling while this one is inside the module: torch's own there

        class Inner(nn.Module):
            def forward(self, x):
                t = threading.Thread(target=lambda: seen.append(other(q, k, v)))
                t.start()
                t.join()
                return x

        wrapped = attention.enable(Inner())
        wrapped(q)
        assert len(calls) == 1 and torch.equal(seen[0], ref)
    attention.disable(mod)
    with torch.no_grad():
        mod(q, k, v)
    assert len(calls) == 1
    assert attention.choices(mod)[0]["kernel"] == "matmul"


def test_exception_inside_the_forward_leaves_no_depth(monkeypatch):
    monkeypatch.setenv("DIT_COMPRESS_ATTENTION", "matmul")
    calls = _spy(monkeypatch)

    class Boom(nn.Module):
        def forward(self, x):
            raise ValueError("boom")

    with pytest.raises(ValueError):
        attention.enable(Boom())(torch.zeros(1))
    q, k, v = _qkv(torch.float32)
    with torch.no_grad():
        _Attn()(q, k, v)
    assert calls == []


def test_not_taken_where_it_would_differ(monkeypatch):
    """Autograd, dropout, causal, boolean masks, 3-D inputs: torch's own function."""
    monkeypatch.setenv("DIT_COMPRESS_ATTENTION", "matmul")
    calls = _spy(monkeypatch)
    mod = attention.enable(_Attn())
    q, k, v = _qkv(torch.float32)
    q.requires_grad_(True)
    out = mod(q, k, v)
    out.sum().backward()  # gradients flow: torch's kernel ran
    assert q.grad is not None and calls == []
    q = q.detach()

    class Causal(nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    class Drop(nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v, dropout_p=0.5)

    with torch.no_grad():
        attention.enable(Causal())(q, k, k)
        attention.enable(Drop())(q, k, v)
        mod(q, k, v, torch.ones(2, 1, 10, 7, dtype=torch.bool))
        mod(q[0], k[0], v[0])
    assert calls == []


def test_auto_is_timed_once_per_shape(monkeypatch):
    monkeypatch.setenv("DIT_COMPRESS_ATTENTION", "auto")
    n = []
    real = attention._decide

    def counted(*a):
        n.append(a[0])
        return real(*a)

    monkeypatch.setattr(attention, "_decide", counted)
    mod = attention.enable(_Attn())
    with torch.no_grad():
        for _ in range(3):
            mod(*_qkv(torch.float32))
        mod(*_qkv(torch.float32, n=12))
    assert len(n) == 2
    rows = attention.choices(mod)
    assert len(rows) == 2 and all(r["kernel"] in ("sdpa", "matmul") and "us" in r for r in rows)
    # forced: no timing
    attention.reset_choices()
    monkeypatch.setenv("DIT_COMPRESS_ATTENTION", "sdpa")
    with torch.no_grad():
        mod(*_qkv(torch.float32))
    assert len(n) == 2 and attention.choices(mod)[0]["kernel"] == "sdpa"


@pytest.mark.parametrize("mask,forced", [(False, "matmul"), (True, "matmul"), (True, "sdpa")])
def test_compiled_enabled_module_runs_the_operator(monkeypatch, mask, forced):
    """Compiled: no graph break, the matmul form through dit_compress::attention inside an
    enabled module (its fake's layout is what the real one returns), torch's kernel outside."""
    import torch._dynamo as dynamo

    monkeypatch.setenv("DIT_COMPRESS_ATTENTION", forced)
    calls = _spy(monkeypatch)
    mod, other = attention.enable(_Attn()), _Attn()
    q, k, v = _qkv(torch.float32)
    ran = 1 if forced == "matmul" else 0  # the operator runs torch's kernel when told to
    m = torch.randn(2, 1, 1, 7) if mask else None
    ref = attention._TORCH_SDPA(q, k, v, attn_mask=m)
    dynamo.reset()
    with torch.no_grad():
        assert dynamo.explain(mod)(q, k, v, m).graph_break_count == 0
        dynamo.reset()
        n = len(calls)
        out = torch.compile(mod, fullgraph=True, backend="aot_eager")(q, k, v, m)
        assert len(calls) == n + ran and (out - ref).abs().max() < 1e-5
        # the operator's layout, and what compiled code does after it (a reshape), agree
        twice = torch.compile(lambda *a: mod(*a).transpose(1, 2).reshape(2, 10, -1) * 2,
                              fullgraph=True, backend="aot_eager")(q, k, v, m)
        assert (twice - ref.transpose(1, 2).reshape(2, 10, -1) * 2).abs().max() < 1e-5
        n = len(calls)
        out = torch.compile(other, fullgraph=True, backend="aot_eager")(q, k, v, m)
        assert len(calls) == n and (out - ref).abs().max() < 1e-6
    assert attention._TRACED == 0


def test_report_names_the_attention_form(tiny_pipeline_dir, tmp_path, monkeypatch):
    """The run's evaluation and the loaded output run the same form; the report says which."""
    import numpy as np

    import compress
    from compress.report.markdown import summary_lines

    monkeypatch.setenv("DIT_COMPRESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("DIT_COMPRESS_ATTENTION", "matmul")
    rep = compress.run_recipe({"name": "t", "calibration": {"num_prompts": 2, "steps": 3},
                               "eval": {"num_prompts": 2, "steps": 3, "latency": True,
                                        "latency_repeats": 1},
                               "passes": [{"ptq": {"weights": {"bits": 8}}}]},
                              str(tiny_pipeline_dir("pixart")), tmp_path / "o")
    rows = rep["speed"]["attention"]
    assert rows and all(r["kernel"] == "matmul" for r in rows)
    assert "two matmuls" in " ".join(summary_lines(rep))
    from compress.models import load_model

    pipe = compress.load_pipeline(tmp_path / "o")
    ev = rep["eval"]
    images = load_model(str(tiny_pipeline_dir("pixart"))).adapter.generate(
        pipe, ev["prompts"], ev["seeds"], ev["steps"], ev["guidance"], ev["resolution"])
    assert np.array_equal(images, rep["_student_images"])


@pytest.mark.parametrize("family", ["dit", "pixart", "sd3", "flux", "sana"])
def test_every_family_samples_the_same_with_either_form(family, tiny_pipeline_dir, monkeypatch):
    """Masks (PixArt's and Sana's caption masks), joint attention (SD3, FLUX through diffusers'
    dispatcher), linear self-attention (Sana): the matmul form gives the fused kernel's images."""
    import numpy as np

    from compress.models import load_model

    handle = load_model(str(tiny_pipeline_dir(family)))
    calls = _spy(monkeypatch)

    def images(forced: str):
        monkeypatch.setenv("DIT_COMPRESS_ATTENTION", forced)
        attention.reset_choices()
        return handle.adapter.generate(handle.pipeline, ["a red circle", "a blue square"],
                                       [0, 1], 3, None, None)

    attention.enable(handle.transformer)
    ref = images("sdpa")
    assert calls == []
    got = images("matmul")
    assert calls, "no attention call took the matmul form"
    assert np.abs(got - ref).max() < 1e-4


def test_compile_repeated_blocks_holds_the_operator(tiny_pipeline_dir, monkeypatch):
    """diffusers' compile_repeated_blocks compiles each block on its own: the blocks carry the
    hooks, so their compiled code runs the matmul form too (and nothing recompiles)."""
    import numpy as np
    import torch._dynamo as dynamo

    from compress.models import load_model

    monkeypatch.setenv("DIT_COMPRESS_ATTENTION", "matmul")
    handle = load_model(str(tiny_pipeline_dir("flux")))
    tr = attention.enable(handle.transformer)

    def images():
        return handle.adapter.generate(handle.pipeline, ["a red circle"], [0], 2, None, None)

    ref = images()
    calls = _spy(monkeypatch)
    dynamo.reset()
    tr.compile_repeated_blocks(fullgraph=True, backend="aot_eager")
    got = images()
    n = len(calls)
    assert n > 0 and np.abs(got - ref).max() < 1e-4
    assert attention._TRACED == 0
    attention.disable(tr)
    assert all(not m._forward_pre_hooks for m in tr.modules())


def test_a_deep_copy_is_enabled_and_disables_on_its_own(monkeypatch):
    import copy

    monkeypatch.setenv("DIT_COMPRESS_ATTENTION", "matmul")
    calls = _spy(monkeypatch)
    mod = attention.enable(_Attn())
    twin = copy.deepcopy(mod)
    attention.disable(twin)
    q, k, v = _qkv(torch.float32)
    with torch.no_grad():
        twin(q, k, v)
        assert calls == []
        mod(q, k, v)
        assert len(calls) == 1
    attention.enable(mod)  # idempotent: one pair of hooks
    assert len(mod._forward_pre_hooks) == 1 and len(mod._forward_hooks) == 1
