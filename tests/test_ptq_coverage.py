"""ptq beyond the blocks' Linears: fp8 (e4m3) weights, weight-only Conv2d, the fast int4 module,
and mixed precision over every weight-bearing layer (patch conv, embedders, adaLN, proj_out)."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from compress.modules.fp8_linear import FP8Linear
from compress.modules.int4 import Int4Linear
from compress.modules.qconv import QConv2d
from compress.modules.qlinear import QLinear
from compress.quant import kernels, qtensor
from compress.quant.observers import patch_rows, rows_linear

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "calibration.num_prompts=1", "calibration.steps=2", "eval.num_prompts=2", "eval.steps=2",
    "eval.latency_repeats=1", "gates={}",
]
ALL_ROLES = ["attn_qkv", "attn_out", "cross_attn", "ff_in", "ff_out", "embed", "adaln", "proj_out"]

fp8 = pytest.mark.skipif(not qtensor.fp8_available(), reason="torch without float8_e4m3fn")


@pytest.fixture
def eager_int4():
    """Int4Linear's unpacking without torch.compile: same values, no compile time in unit tests."""
    kernels.set_fusion(False)
    yield
    kernels.set_fusion(None)


@fp8
@pytest.mark.parametrize("std", [0.002, 50.0])
def test_fp8_weights_per_channel_scale(std):
    torch.manual_seed(0)
    w = torch.randn(64, 256) * std * torch.linspace(0.1, 1, 64)[:, None]  # rows of unequal range
    b = torch.randn(64)
    m = FP8Linear.from_weight(w, b)
    assert m.qweight.dtype == torch.float8_e4m3fn and m.scale.dtype == torch.float32
    # each channel's absmax lands exactly on e4m3's largest value
    assert torch.equal(m.qweight.float().abs().amax(dim=1), torch.full((64,), 448.0))
    # ~31 dB for 3 mantissa bits; unscaled e4m3 gives 11 dB (std 0.002, subnormals) or
    # 3 dB (std 50, saturation at 448), a scale mapping absmax to 4480 gives 2 dB
    assert qtensor.sqnr_db(w, m.dequantized_weight()) >= 25
    x = torch.randn(5, 256)
    assert torch.equal(m(x), F.linear(x, m.dequantized_weight(), b))
    assert m(x.bfloat16()).dtype == torch.bfloat16
    m.to(torch.bfloat16)  # storage stays fp8 + fp32 scales
    assert m.qweight.dtype == torch.float8_e4m3fn and m.scale.dtype == torch.float32


@fp8
def test_fp8_recipe_keys_validated():
    from compress.passes.ptq import Config, layer_spec

    with pytest.raises(ValidationError, match="fp8_e4m3"):
        Config.model_validate({"weights": {"format": "fp8_e4m3", "bits": 4}})
    with pytest.raises(ValidationError, match="fp8_e4m3"):
        Config.model_validate({"weights": {"format": "fp8_e4m3", "granularity": "group"}})
    with pytest.raises(ValidationError, match="activations"):
        Config.model_validate({"weights": {"format": "fp8_e4m3"}, "activations": {"bits": 8}})
    with pytest.raises(ValidationError, match="format"):
        Config.model_validate({"weights": {"format": "fp4"}})
    # an fp8 override on a grouped int4 default takes fp8's own layout
    cfg = Config.model_validate({
        "weights": {"bits": 4, "granularity": "group", "group_size": 64},
        "overrides": {"proj_out": {"format": "fp8_e4m3"}},
    })
    spec = layer_spec(cfg, "proj_out", "proj_out")
    assert (spec.format, spec.bits, spec.group()) == ("fp8_e4m3", 8, None)


@fp8
def test_fp8_and_conv_ptq_reload_bit_equal(tiny_pipeline_dir, tmp_path, monkeypatch):
    """fp8 weights on every weight-bearing layer of tiny PixArt (the patch conv too), saved as
    float8 in safetensors, rebuilt from the manifest, bit-equal images."""
    from safetensors import safe_open

    import compress
    from compress.models import load_model

    monkeypatch.setenv("DIT_COMPRESS_CACHE", str(tmp_path / "cache"))
    src = tiny_pipeline_dir("pixart")
    out = tmp_path / "out"
    recipe = {"name": "fp8", "passes": [
        {"ptq": {"weights": {"format": "fp8_e4m3"}, "include": ALL_ROLES}}]}
    report = compress.run_recipe(recipe, model=str(src), out=out, overrides=TINY)
    p = report["passes"][0]
    kinds = {r["layer"]: r["kind"] for r in p["layers"]}
    assert kinds["pos_embed.proj"] == "conv" and kinds["proj_out"] == "fp8"
    assert kinds["adaln_single.linear"] == "fp8" and kinds["caption_projection.linear_1"] == "fp8"
    assert p["avg_bits_quantized_layers"] == 8
    assert min(r["weight_sqnr_db"] for r in p["layers"]) > 25
    with safe_open(str(out / "transformer" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert f.get_tensor("pos_embed.proj.wq.qweight").dtype == torch.float8_e4m3fn
        assert f.get_tensor("proj_out.qweight").dtype == torch.float8_e4m3fn
    pipe = compress.load_pipeline(out)
    assert isinstance(pipe.transformer.pos_embed.proj, QConv2d)
    assert isinstance(pipe.transformer.pos_embed.proj.wq, FP8Linear)
    ev = report["eval"]
    images = load_model(str(src)).adapter.generate(pipe, ev["prompts"], ev["seeds"], ev["steps"],
                                                   ev["guidance"], ev["resolution"])
    assert np.array_equal(images, report["_student_images"])


@pytest.mark.parametrize("kw", [
    {"kernel_size": 2, "stride": 2},  # a patch embedder
    {"kernel_size": 3, "padding": 1, "groups": 4},
    {"kernel_size": 3, "padding": "same", "dilation": 2},
    {"kernel_size": 3, "padding": 1, "padding_mode": "reflect", "stride": 2},
])
def test_qconv2d_int8(kw):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, **kw)
    x = torch.randn(2, 8, 12, 12)
    q = QConv2d.from_conv(conv, bits=8)
    assert not any(t.is_floating_point() and t.numel() == conv.weight.numel()
                   for t in q.state_dict().values())  # no float copy of the weight
    wd = q.dequantized_weight()
    assert wd.shape == conv.weight.shape
    ref = conv._conv_forward(x, wd, q.bias)  # nn.Conv2d's own padding logic
    assert torch.equal(q(x), ref)
    assert qtensor.sqnr_db(conv(x), q(x)) >= 35
    # patch rows line up with the flattened weight, grouped or not
    y = rows_linear(patch_rows(conv, x), conv.weight.flatten(1), conv.groups)
    y_ref = (conv(x) - conv.bias[:, None, None]).permute(0, 2, 3, 1).reshape(-1, 16)
    assert torch.allclose(y, y_ref, atol=1e-5)


def test_qconv2d_grouped_int4_is_int4linear(eager_int4):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1)  # fan-in 72 = 2 groups of 36
    q = QConv2d.from_conv(conv, bits=4, group_size=36)
    assert isinstance(q.wq, Int4Linear) and q.wq.group_size == 36
    x = torch.randn(1, 8, 6, 6)
    assert qtensor.sqnr_db(conv(x), q(x)) >= 15


@pytest.mark.parametrize("granularity,group,in_f,cls", [
    ("group", 16, 64, Int4Linear),
    ("channel", 64, 48, Int4Linear),  # one group spanning the (even) fan-in
    ("group", 16, 40, QLinear),  # qtensor's groups of 40/3 -> 14: Int4Linear cannot hold them
    ("channel", 64, 33, QLinear),  # odd fan-in
])
def test_weight_only_int4_uses_int4linear(granularity, group, in_f, cls, eager_int4):
    from compress.models.base import ModelHandle
    from compress.models.generic import ADAPTER
    from compress.passes.ptq import Config, apply, restore

    torch.manual_seed(0)
    lin = nn.Linear(in_f, 32)
    for sym in (True, False):
        m = nn.Sequential(nn.Linear(in_f, 32))
        m[0].load_state_dict(lin.state_dict())
        cfg = Config.model_validate({"weights": {"bits": 4, "granularity": granularity,
                                                 "group_size": group, "symmetric": sym},
                                     "include": ["0"]})
        res = apply(ModelHandle(transformer=m, adapter=ADAPTER), None, cfg)
        assert type(m[0]) is cls
        assert res.meta["layers"]["0"]["kind"] == ("int4" if cls is Int4Linear else "weight_only")
        want = QLinear.from_linear(lin, 4, group if granularity == "group" else None, sym)
        assert torch.equal(m[0].dequantized_weight(), want.dequantized_weight())
        x = torch.randn(6, in_f)
        assert torch.equal(m[0](x), want(x))
        # restore() rebuilds the same module from the manifest meta
        fresh = nn.Sequential(nn.Linear(in_f, 32))
        restore(fresh, cfg, res.meta)
        fresh.load_state_dict(m.state_dict(), assign=True)
        assert type(fresh[0]) is cls and torch.equal(fresh(x), m(x))


def test_mixed_precision_covers_every_weight_layer(tiny_pipeline_dir, tmp_path, monkeypatch,
                                                  eager_int4):
    """w4a8-mp on tiny PixArt: the table lists the patch conv, embedders, adaLN and proj_out
    (weight-only, 16 allowed), keep_high keeps a layer in 16 bits, the budget holds."""
    import compress

    monkeypatch.setenv("DIT_COMPRESS_CACHE", str(tmp_path / "cache"))
    src = tiny_pipeline_dir("pixart")
    report = compress.run_recipe(
        str(ROOT / "recipes" / "w4a8-mp.yaml"), model=str(src), out=None,
        overrides=TINY + ["eval.enabled=false", "passes.0.ptq.calib_samples=4",
                          "passes.0.ptq.mixed_precision.metrics=[output]",
                          "passes.0.ptq.mixed_precision.keep_high=[pos_embed.proj]"])
    p = report["passes"][0]
    mp = p["mixed_precision"]
    table = {r["layer"]: r for r in mp["table"]}
    for name in ("pos_embed.proj", "adaln_single.linear", "proj_out",
                 "adaln_single.emb.timestep_embedder.linear_1", "caption_projection.linear_2",
                 "transformer_blocks.0.attn1.to_q", "transformer_blocks.1.ff.net.2"):
        assert name in table
    assert {r["role"] for r in mp["table"]} == set(ALL_ROLES)
    # auxiliary layers run weight-only and may stay 16-bit; block Linears choose 4 or 8 on int8
    assert table["adaln_single.linear"]["act_bits"] is None and "out_err@16" in table["proj_out"]
    assert table["transformer_blocks.0.attn1.to_q"]["act_bits"] == 8
    assert "out_err@16" not in table["transformer_blocks.0.attn1.to_q"]
    assert table["pos_embed.proj"]["bits"] == 16 and mp["kept_full_precision"] == ["pos_embed.proj"]
    assert mp["avg_bits"] <= 4.5 and p["avg_bits_quantized_layers"] <= 4.5
    kinds = {r["layer"]: r["kind"] for r in p["layers"]}
    assert "pos_embed.proj" not in kinds  # kept in full precision
    assert kinds["transformer_blocks.0.attn1.to_q"] in ("w4a8", "w8a8")
    assert kinds["adaln_single.linear"] in ("int4", "weight_only")
    assert all(r["act_bits"] is None for r in p["layers"] if r["role"] in ("embed", "adaln",
                                                                         "proj_out"))
