"""W8A8Linear, Int4Linear and their kernels: accuracy, fake-quant agreement, bit-equal reloads.

The fused (torch.compile) element-wise path is switched off here: compiling takes longer than
this whole file may, and the eager functions are the same arithmetic.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from compress.modules.int4 import Int4Linear
from compress.modules.w8a8 import (
    TimestepContext,
    W8A8FeedForward,
    W8A8Linear,
    attach_timestep_context,
    clear_input_cache,
    fuse_feedforwards,
)
from compress.quant import kernels
from compress.quant.qtensor import sqnr_db


@pytest.fixture(autouse=True)
def _eager_kernels():
    kernels.set_fusion(False)
    clear_input_cache()
    yield
    kernels.set_fusion(None)
    clear_input_cache()


def _linear(in_f: int = 256, out_f: int = 192, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias).eval()


def _x(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _w8a8(lin: nn.Linear, x: torch.Tensor, act: str, **kw) -> W8A8Linear:
    scale = x.abs().max() / 127 if act == "static" else None
    return W8A8Linear.from_linear(lin, act=act, act_scale=scale, **kw)


def _roundtrip(module: nn.Module, empty: nn.Module, tmp_path: Path) -> nn.Module:
    path = tmp_path / "m.safetensors"
    save_file(module.state_dict(), str(path))
    empty.load_state_dict(load_file(str(path)), assign=True)
    return empty


# ---------------------------------------------------------------------------------------------
# W8A8


@pytest.mark.parametrize("act", ["dynamic", "static"])
def test_w8a8_accuracy_and_reference(act: str) -> None:
    lin = _linear()
    x = _x(3, 40, 256)
    q = _w8a8(lin, x, act)
    with torch.no_grad():
        ref = lin(x)
        y = q(x)
    assert y.shape == ref.shape and y.dtype == torch.float32
    assert sqnr_db(ref, y) > 30
    # Same codes and scales, fp32 math: only accumulation order differs.
    assert (y - q.reference_forward(x)).abs().max() < 1e-4


@pytest.mark.parametrize("act", ["dynamic", "static"])
def test_w8a8_bf16_in_bf16_out(act: str) -> None:
    lin = _linear()
    x = _x(2, 33, 256)
    q = _w8a8(lin, x, act)
    with torch.no_grad():
        y = q(x.bfloat16())
        ref = q.reference_forward(x.bfloat16())
    assert y.dtype == torch.bfloat16
    assert sqnr_db(lin(x).detach(), y) > 30
    assert sqnr_db(ref, y) > 45  # a bf16 rounding or two apart


def test_w8a8_smooth_folds_into_weights() -> None:
    lin = _linear()
    x = _x(64, 256)
    x[:, :4] *= 30  # outlier channels, what smoothing is for
    smooth = x.abs().amax(0).clamp_min(1e-5).sqrt()
    q = W8A8Linear.from_linear(lin, act="static", act_scale=(x / smooth).abs().max() / 127,
                               smooth=smooth)
    with torch.no_grad():
        assert sqnr_db(lin(x), q(x)) > 30
        assert (q(x) - q.reference_forward(x)).abs().max() < 1e-4
    assert torch.allclose(q.dequantized_weight(), lin.weight, atol=2e-3)


@pytest.mark.parametrize("act", ["dynamic", "static"])
@pytest.mark.parametrize("bias", [True, False])
def test_w8a8_safetensors_roundtrip_bit_equal(act: str, bias: bool, tmp_path: Path) -> None:
    lin = _linear(bias=bias)
    x = _x(2, 17, 256).bfloat16()
    q = _w8a8(lin, x.float(), act)
    with torch.no_grad():
        y = q(x)
    empty = W8A8Linear(256, 192, bias=bias, act=act, device="meta")
    back = _roundtrip(q, empty, tmp_path)
    assert back.weight.device.type == "cpu" and back.weight.dtype == torch.int8
    with torch.no_grad():
        assert torch.equal(back(x), y)


def test_w8a8_to_bf16_keeps_fp32_scales() -> None:
    q = _w8a8(_linear(), _x(8, 256), "static")
    scale = q.weight_scale.clone()
    q.to(torch.bfloat16)
    assert q.weight_scale.dtype == torch.float32 and torch.equal(q.weight_scale, scale)
    assert q.act_scale.dtype == torch.float32 and q.weight.dtype == torch.int8


def test_w8a8_rejects_bad_config() -> None:
    lin = _linear()
    with pytest.raises(ValueError):
        W8A8Linear.from_linear(lin, act="static")
    with pytest.raises(ValueError):
        W8A8Linear.from_linear(lin, act="dynamic", act_scale=0.1)
    with pytest.raises(ValueError):
        W8A8Linear(4, 4, act="dynamic", n_groups=2)


def test_shared_input_quantised_once_and_invalidated_in_place() -> None:
    lin_a, lin_b = _linear(seed=0), _linear(seed=1)
    x = _x(5, 256)
    scale = x.abs().max() / 127
    qa = W8A8Linear.from_linear(lin_a, act="static", act_scale=scale)
    qb = W8A8Linear.from_linear(lin_b, act="static", act_scale=scale)
    with torch.no_grad():
        ya, yb = qa(x), qb(x)  # qb reuses qa's codes
        clear_input_cache()
        assert torch.equal(qb(x), yb)
        x.mul_(0.5)  # in place: the version counter must invalidate the cached codes
        assert not torch.equal(qa(x), ya)
        clear_input_cache()
        assert torch.equal(qa(x), qa(x.clone()))


def test_w8a8_under_inference_mode() -> None:
    """Tensors made under torch.inference_mode() have no version counter: the layer runs
    (no shared-input cache for them), gives no_grad's output, and a LoRA fold into layers built
    under inference_mode is seen by their next call."""
    from compress.lora.fold import fold_

    lin = _linear()
    x = _x(6, 256)
    ref = W8A8Linear.from_linear(lin, act="dynamic")
    with torch.no_grad():
        expected = ref(x)
    with torch.inference_mode():
        q = W8A8Linear.from_linear(lin, act="dynamic")  # inference tensors for buffers too
        xi = x.clone()
        assert torch.equal(q(xi), expected)
        xi.mul_(0.5)  # in place, no version bump: the cache must not hand back old codes
        assert torch.equal(q(xi), ref(x * 0.5))
        delta = torch.randn(192, 256, generator=torch.Generator().manual_seed(3)) * 0.05
        fold_(q, delta)
        folded = q(x.clone())
    want = (x @ (lin.weight + delta).t() + lin.bias).detach()
    assert not torch.equal(folded, expected)
    assert sqnr_db(want, folded) > 30


@pytest.mark.parametrize("act", ["none", "gelu_tanh"])
def test_rescale_split_store_agrees_with_one_pass(act: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused rescale's two forms (one loop to bf16; fp32 store then a cast) compute the
    same function: equal up to one bf16 rounding of the result."""
    g = torch.Generator().manual_seed(0)
    acc = torch.randint(-3000, 3000, (16, 64), dtype=torch.int32, generator=g)
    rows, cols = torch.rand(16, 1, generator=g) * 1e-3, torch.rand(64, generator=g)
    bias = torch.randn(64, generator=g)
    out = {}
    for form in ("split", "fused"):
        monkeypatch.setenv("DIT_COMPRESS_RESCALE_STORE", form)
        kernels.split_store.cache_clear()
        kernels.set_fusion(True)
        out[form] = kernels.rescale_rows(acc, rows, bias, torch.bfloat16, act, cols)
    kernels.split_store.cache_clear()
    exact = kernels.apply_activation(acc.float() * rows * cols + bias, act)
    for y in out.values():
        assert y.dtype == torch.bfloat16
        assert ((y.float() - exact).abs() <= exact.abs() * 2 ** -7 + 1e-6).all()
    assert ((out["split"].float() - out["fused"].float()).abs()
            <= exact.abs() * 2 ** -7 + 1e-6).all()


# ---------------------------------------------------------------------------------------------
# timestep groups


class _Wrap(nn.Module):
    def __init__(self, lin: nn.Module) -> None:
        super().__init__()
        self.lin = lin

    def forward(self, x: torch.Tensor, timestep: torch.Tensor | None = None) -> torch.Tensor:
        return self.lin(x)


def test_timestep_context_groups() -> None:
    ctx = TimestepContext([300, 700])
    assert ctx.n_groups == 3
    assert [ctx.group_of(t) for t in (0, 299.5, 300, 699, 700, 999)] == [0, 0, 1, 1, 2, 2]
    assert ctx.group_of(torch.tensor([750, 750])) == 2
    assert TimestepContext.from_dict(ctx.to_dict()) == ctx
    assert TimestepContext.uniform(4).boundaries == [250.0, 500.0, 750.0]
    with pytest.raises(ValueError):
        TimestepContext([5, 1])


def test_per_timestep_scales_pick_the_group(tmp_path: Path) -> None:
    lin = _linear()
    x = _x(4, 256)
    scales = torch.tensor([0.01, 0.03, 0.2])
    q = W8A8Linear.from_linear(lin, act="static", act_scale=scales)
    model = _Wrap(q)
    with pytest.raises(RuntimeError, match="timestep"):
        model(x, timestep=torch.tensor([10]))
    ctx = TimestepContext([300, 700])
    attach_timestep_context(model, ctx)
    with torch.no_grad():
        for t, g in ((10, 0), (500, 1), (900, 2)):
            single = W8A8Linear.from_linear(lin, act="static", act_scale=scales[g])
            clear_input_cache()
            y = model(x, timestep=torch.tensor([t, t]))
            assert ctx.group == g
            assert torch.equal(y, single(x))
            clear_input_cache()
            assert torch.equal(model(x, torch.tensor([t])), y)  # positional timestep too
    # reload with a fresh context: same outputs
    empty = W8A8Linear(256, 192, act="static", n_groups=3, device="meta")
    back = _Wrap(_roundtrip(q, empty, tmp_path))
    attach_timestep_context(back, TimestepContext.from_dict(ctx.to_dict()))
    with torch.no_grad():
        clear_input_cache()
        a = model(x, timestep=torch.tensor([500]))
        clear_input_cache()
        assert torch.equal(back(x, timestep=torch.tensor([500])), a)


def test_context_group_count_must_match() -> None:
    q = W8A8Linear.from_linear(_linear(), act="static", act_scale=[0.1, 0.2])
    with pytest.raises(ValueError, match="groups"):
        attach_timestep_context(_Wrap(q), TimestepContext([100, 200]))


# ---------------------------------------------------------------------------------------------
# feed-forward fusion


@pytest.mark.parametrize("act", ["dynamic", "static"])
def test_feedforward_fusion(act: str, tmp_path: Path) -> None:
    from diffusers.models.attention import FeedForward

    torch.manual_seed(0)
    ff = FeedForward(64, mult=4, activation_fn="gelu-approximate").eval()
    x = _x(2, 12, 64)
    with torch.no_grad():
        ref = ff(x)
        h = ff.net[0](x)
    root = nn.Module()
    root.ff = copy.deepcopy(ff)
    root.ff.net[0].proj = _w8a8(ff.net[0].proj, x, act)
    root.ff.net[2] = _w8a8(ff.net[2], h, act)
    keys = set(root.state_dict())
    with torch.no_grad():
        unfused = root.ff(x.bfloat16())
    assert fuse_feedforwards(root) == ["ff"]
    assert isinstance(root.ff, W8A8FeedForward) and set(root.state_dict()) == keys
    with torch.no_grad():
        y = root.ff(x.bfloat16())
        assert sqnr_db(ref, y) > 30
        assert sqnr_db(unfused, y) > 40
        assert sqnr_db(root.ff.reference_forward(x), root.ff(x)) > 60
        # bf16 inputs: the dynamic hand-over quantises the hidden activation in the first
        # GEMM's rescale pass (no bf16 copy of it); as exact as the fp32 reference allows
        ref_q = root.ff.reference_forward(x)
        assert sqnr_db(ref_q, y) > sqnr_db(ref_q, unfused) - 0.5
    # restore: build unfused skeleton, fuse, load -> bit-equal
    skel = nn.Module()
    skel.ff = copy.deepcopy(ff)
    skel.ff.net[0].proj = W8A8Linear(64, 256, act=act, device="meta")
    skel.ff.net[2] = W8A8Linear(256, 64, act=act, device="meta")
    fuse_feedforwards(skel)
    back = _roundtrip(root, skel, tmp_path)
    with torch.no_grad():
        assert torch.equal(back.ff(x.bfloat16()), y)


def test_dynamic_feedforward_hands_over_codes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both projections dynamic, bf16: the first GEMM's rescale pass quantises per token for the
    second (smoothing of the second layer's input included), as close to the fp32 reference as
    quantising the bf16 hidden activation is."""
    from diffusers.models.attention import FeedForward

    torch.manual_seed(0)
    ff = FeedForward(64, mult=4, activation_fn="gelu-approximate").eval()
    x = _x(2, 12, 64)
    smooth = torch.rand(256) * 4 + 0.25  # uneven, so a missing fold would show
    root = nn.Module()
    root.ff = copy.deepcopy(ff)
    root.ff.net[0].proj = W8A8Linear.from_linear(ff.net[0].proj, act="dynamic")
    root.ff.net[2] = W8A8Linear.from_linear(ff.net[2], act="dynamic", smooth=smooth)
    with torch.no_grad():
        unfused = root.ff(x.bfloat16())
    fuse_feedforwards(root)
    calls = []
    real = W8A8Linear.matmul_requantize
    monkeypatch.setattr(W8A8Linear, "matmul_requantize",
                        lambda self, *a: calls.append(1) or real(self, *a))
    with torch.no_grad():
        y = root.ff(x.bfloat16())
        ref_q = root.ff.reference_forward(x)
    assert calls == [1]
    assert sqnr_db(unfused, y) > 35
    assert sqnr_db(ref_q, y) > sqnr_db(ref_q, unfused) - 0.5 > 30


# ---------------------------------------------------------------------------------------------
# int4


def test_int4_pack_roundtrip() -> None:
    codes = torch.randint(0, 16, (7, 256), dtype=torch.uint8)
    packed = kernels.pack_int4(codes, 64)
    assert packed.shape == (7, 128)
    assert torch.equal(kernels.unpack_int4(packed, 64), codes)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [64, 128])
def test_int4_accuracy_and_reference(symmetric: bool, group_size: int) -> None:
    lin = _linear()
    x = _x(3, 20, 256)
    q = Int4Linear.from_linear(lin, group_size, symmetric)
    assert not any(b.is_floating_point() and b.numel() >= lin.weight.numel() for b in q.buffers())
    with torch.no_grad():
        y = q(x)
        assert sqnr_db(lin(x), y) > 18  # int4 on Gaussian weights: ~23 dB
        assert (y - q.reference_forward(x)).abs().max() < 1e-4
        yb = q(x.bfloat16())
    assert yb.dtype == torch.bfloat16 and sqnr_db(y, yb) > 35


def test_int4_ragged_in_features() -> None:
    lin = _linear(in_f=100, out_f=30)
    q = Int4Linear.from_linear(lin, 64)
    x = _x(5, 100)
    with torch.no_grad():
        assert sqnr_db(lin(x), q(x)) > 18
        assert (q(x) - q.reference_forward(x)).abs().max() < 1e-4


@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_safetensors_roundtrip_bit_equal(symmetric: bool, tmp_path: Path) -> None:
    lin = _linear()
    q = Int4Linear.from_linear(lin, 64, symmetric)
    x = _x(2, 9, 256).bfloat16()
    with torch.no_grad():
        y = q(x)
    empty = Int4Linear(256, 192, bias=True, group_size=64, symmetric=symmetric, device="meta")
    back = _roundtrip(q, empty, tmp_path)
    with torch.no_grad():
        assert torch.equal(back(x), y)
    q.to(torch.bfloat16)
    assert q.scale.dtype == torch.float16 and q.bias.dtype == torch.float32


@pytest.mark.parametrize("act", ["dynamic", "static"])
def test_w8a8_portable_int_mm_path_agrees(act: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Where oneDNN is missing (CUDA, other builds) torch._int_mm runs the same quantisation.
    lin = _linear()
    x = _x(40, 256)
    q = _w8a8(lin, x, act)
    with torch.no_grad():
        fast = q(x)
        monkeypatch.setattr(kernels, "prepack_int8", lambda w: None)
        q.release()
        clear_input_cache()
        slow = q(x)
    assert q.prepare()["packed"] is None
    assert (fast - slow).abs().max() < 1e-4


def test_w8a8_int_mm_path_survives_inductor_freezing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inductor's freezing passes rewrite ``_int_mm -> float -> * row -> * col`` into oneDNN's
    int8 linear, the reference kernel (hundreds of times slower) on CPUs where the int_mm path
    was chosen; the compiled layer must keep torch._int_mm, and agree with eager."""
    from torch._inductor import config as inductor_config
    from torch._inductor.utils import run_and_get_code

    monkeypatch.setattr(kernels, "prepack_int8", lambda w: None)
    q = W8A8Linear.from_linear(_linear(), act="dynamic")
    q.activation = "gelu"
    x = _x(64, 256)
    torch._dynamo.reset()
    # config.patch, not monkeypatch: undoing a monkeypatch deletes the config entry
    with torch.no_grad(), inductor_config.patch(freezing=True):
        eager = q(x)
        y, code = run_and_get_code(torch.compile(q), x)
    torch._dynamo.reset()
    assert q.prepare()["packed"] is None
    src = "\n".join(code)
    assert "_int_mm" in src and "qlinear_pointwise" not in src
    assert (y - eager).abs().max() < 1e-4
