"""Quantisation coverage on generic modules with torch's attention and transformer layers.

nn.MultiheadAttention packs q/k/v into one Parameter and reads out_proj.weight raw;
nn.TransformerEncoderLayer in eval runs a fused kernel on raw weights. The generic adapter's
``prepare`` replaces them with unfused equivalents (compress/modules/mha.py) so that the ptq
pass quantises those weights and the forward pass really uses the quantised modules.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from torch import nn

import compress
from compress.models.generic import ADAPTER, _GenericAdapter
from compress.modules.mha import (
    UnfusedMultiheadAttention,
    UnfusedTransformerEncoder,
    UnfusedTransformerEncoderLayer,
    unfuse,
)
from compress.quant.qtensor import sqnr_db

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

E, HEADS, FF = 32, 4, 64


def _perturbed(m: nn.Module) -> nn.Module:
    """Non-zero biases everywhere, so a wrong bias split would show."""
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


# ------------------------------------------------------------------ (i) numerical equivalence


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("variant", ["packed", "kdim_vdim", "bias_kv_zero_attn"])
def test_unfused_mha_matches_torch(batch_first, need_weights, variant):
    torch.manual_seed(0)
    kw = {"kdim": 24, "vdim": 20} if variant == "kdim_vdim" else {}
    if variant == "bias_kv_zero_attn":
        kw = {"add_bias_kv": True, "add_zero_attn": True}
    ref = _perturbed(nn.MultiheadAttention(E, HEADS, batch_first=batch_first, **kw)).eval()
    new = UnfusedMultiheadAttention.from_torch(ref).eval()
    assert all(isinstance(getattr(new, n), nn.Linear)
               for n in ("q_proj", "k_proj", "v_proj", "out_proj"))
    n, tgt, src = 3, 5, 7
    kd, vd = kw.get("kdim", E), kw.get("vdim", E)

    def seq(length, dim):
        return torch.randn(n, length, dim) if batch_first else torch.randn(length, n, dim)

    q, k, v = seq(tgt, E), seq(src, kd), seq(src, vd)
    kpm = torch.zeros(n, src, dtype=torch.bool)
    kpm[0, -3:] = True
    attn_mask = torch.rand(tgt, src) > 0.6
    attn_mask[:, 0] = False
    with torch.no_grad():
        for avg in (True, False):
            a = ref(q, k, v, key_padding_mask=kpm, attn_mask=attn_mask, need_weights=need_weights,
                    average_attn_weights=avg)
            b = new(q, k, v, key_padding_mask=kpm, attn_mask=attn_mask, need_weights=need_weights,
                    average_attn_weights=avg)
            torch.testing.assert_close(b[0], a[0], atol=1e-5, rtol=0)
            if need_weights:
                torch.testing.assert_close(b[1], a[1], atol=1e-5, rtol=0)
            else:
                assert a[1] is None and b[1] is None
        # self-attention in eval is torch's own fused path; float masks; unbatched input
        x = seq(tgt, E)
        if variant == "packed":
            a = ref(x, x, x, key_padding_mask=kpm[:, :tgt], need_weights=False)[0]
            b = new(x, x, x, key_padding_mask=kpm[:, :tgt], need_weights=False)[0]
            torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
        fmask = torch.randn(n * HEADS, tgt, src)
        torch.testing.assert_close(new(q, k, v, attn_mask=fmask)[0], ref(q, k, v, attn_mask=fmask)[0],
                                   atol=1e-5, rtol=0)
        u = (q[0], k[0], v[0]) if batch_first else (q[:, 0], k[:, 0], v[:, 0])
        for i in (0, 1):
            torch.testing.assert_close(new(*u)[i], ref(*u)[i], atol=1e-5, rtol=0)


def test_unfused_mha_training_dropout_and_state_names():
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(E, HEADS, dropout=0.5, batch_first=True)
    new = UnfusedMultiheadAttention.from_torch(ref)
    assert new.training and new.dropout == 0.5
    assert set(new.state_dict()) == {f"{p}.{t}" for p in ("q_proj", "k_proj", "v_proj", "out_proj")
                                     for t in ("weight", "bias")}
    assert torch.equal(torch.cat([new.q_proj.weight, new.k_proj.weight, new.v_proj.weight]),
                       ref.in_proj_weight)
    x = torch.randn(2, 6, E)
    torch.manual_seed(1)
    y1 = new(x, x, x, need_weights=False)[0]
    torch.manual_seed(2)
    y2 = new(x, x, x, need_weights=False)[0]
    assert not torch.allclose(y1, y2)  # dropout is active in training
    new.eval()
    torch.testing.assert_close(new(x, x, x)[0], ref.eval()(x, x, x)[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("batch_first", [True, False])
def test_unfused_encoder_matches_fused_path(batch_first):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, HEADS, FF, dropout=0.1, batch_first=batch_first,
                                       activation="gelu")
    ref = _perturbed(nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(E))).eval()
    new = copy.deepcopy(ref)
    records = unfuse(new)  # the root itself is converted in place
    assert isinstance(new, UnfusedTransformerEncoder)
    assert all(isinstance(m, UnfusedTransformerEncoderLayer) for m in new.layers)
    assert {r["module"] for r in records} == {"", "layers.0", "layers.1", "layers.0.self_attn",
                                              "layers.1.self_attn"}
    x = torch.randn(3, 6, E) if batch_first else torch.randn(6, 3, E)
    kpm = torch.zeros(3, 6, dtype=torch.bool)
    kpm[1, -2:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(6)
    with torch.no_grad():
        for kwargs in ({}, {"src_key_padding_mask": kpm}, {"mask": causal}):
            # batch_first eval is torch's fused kernel (nested tensors with a padding mask)
            torch.testing.assert_close(new(x, **kwargs), ref(x, **kwargs), atol=1e-5, rtol=0)


def test_unfused_transformer_with_decoder():
    torch.manual_seed(0)
    ref = _perturbed(nn.Transformer(E, HEADS, 1, 1, FF, dropout=0.0, batch_first=True)).eval()
    new = copy.deepcopy(ref)
    unfuse(new)
    assert new.decoder.layers[0].multihead_attn.cross
    roles = {n: r for n, _, r in ADAPTER.weight_layers(new)}
    assert roles["decoder.layers.0.multihead_attn.q_proj"] == "cross_attn"
    assert roles["decoder.layers.0.self_attn.out_proj"] == "attn_out"
    src, tgt = torch.randn(2, 7, E), torch.randn(2, 5, E)
    m = nn.Transformer.generate_square_subsequent_mask(5)
    with torch.no_grad():
        torch.testing.assert_close(new(src, tgt, tgt_mask=m), ref(src, tgt, tgt_mask=m),
                                   atol=1e-5, rtol=0)


# ------------------------------------------------------------- (ii) the ptq pass on such a model


class Net(nn.Module):
    """An encoder of two torch layers and an attention-pooling head (nn.MultiheadAttention)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(16, E)
        layer = nn.TransformerEncoderLayer(E, HEADS, FF, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2)
        self.pool = nn.MultiheadAttention(E, HEADS, batch_first=True)
        self.query = nn.Parameter(torch.randn(1, 2, E))
        self.head = nn.Linear(E, 8)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.encoder(self.embed(x), src_key_padding_mask=mask)
        o, _ = self.pool(self.query.expand(len(x), -1, -1), h, h, key_padding_mask=mask)
        return self.head(o)


def _data():
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(2, 6, 16, generator=g) for _ in range(3)]
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[1, -2:] = True
    return xs, mask


def _attention_and_ff_share(net: nn.Module) -> float:
    """(attention projections incl. packed in_proj + feed-forward weights) / all parameters."""
    target = 0
    for m in net.modules():
        if isinstance(m, nn.MultiheadAttention):
            target += m.in_proj_weight.numel() + m.out_proj.weight.numel()
        elif isinstance(m, nn.TransformerEncoderLayer):
            target += m.linear1.weight.numel() + m.linear2.weight.numel()
    return target / sum(p.numel() for p in net.parameters())


def _run(net, act: bool, out=None):
    xs, mask = _data()

    def calibrate(m):
        with torch.no_grad():
            for x in xs:
                m(x, mask)

    ptq = {"weights": {"bits": 8}}
    if act:
        ptq["activations"] = {"bits": 8, "mode": "dynamic"}
    recipe = {"name": "mha-coverage", "passes": [{"ptq": ptq}],
              "eval": {"enabled": False, "latency": False}}
    # in place: the tests below look at the compressed net itself
    return compress.run_recipe(recipe, model=net, calibrate_fn=calibrate, out=out, inplace=True)


@pytest.mark.parametrize("act", [False, True], ids=["w8", "w8a8-dynamic"])
def test_ptq_covers_mha_and_encoder_layers(act):
    torch.manual_seed(0)
    net = Net().eval()
    threshold = 0.9 * _attention_and_ff_share(net)
    xs, mask = _data()
    with torch.no_grad():
        ref = net(xs[0], mask)
    report = _run(net, act)
    p = report["passes"][0]
    used = p["weights_quantized_and_used_fraction"]
    assert used is not None and used >= threshold, (used, threshold)
    assert used == pytest.approx(p["weights_quantized_fraction"])  # nothing quantised sits idle
    layers = {r["layer"]: r["role"] for r in p["layers"]}
    for i in (0, 1):
        pre = f"encoder.layers.{i}."
        assert {layers[pre + "self_attn.q_proj"], layers[pre + "self_attn.k_proj"]} == {"attn_qkv"}
        assert layers[pre + "self_attn.out_proj"] == "attn_out"
        assert layers[pre + "linear1"] == "ff_in" and layers[pre + "linear2"] == "ff_out"
    # the pooling query (2 tokens) attends to the 6 encoder tokens: cross-attention by length
    assert layers["pool.out_proj"] == "cross_attn"
    mapping = {r["module"]: r for r in report["model"]["prepared"]}
    assert mapping["pool"]["weights"]["in_proj_weight"] == [
        "q_proj.weight", "k_proj.weight", "v_proj.weight"]
    assert mapping["encoder.layers.0"]["now"] == "UnfusedTransformerEncoderLayer"
    assert mapping["encoder"]["now"] == "UnfusedTransformerEncoder"
    with torch.no_grad():  # plain inference: no hooks anywhere
        got = net(xs[0], mask)
    assert sqnr_db(ref, got) >= 30


# ------------------------------------------------- (iii) without the preparation it falls short


def test_without_prepare_coverage_falls_short(monkeypatch):
    monkeypatch.setattr(_GenericAdapter, "prepare", None)  # the pass then skips the hook
    torch.manual_seed(0)
    net = Net().eval()
    threshold = 0.9 * _attention_and_ff_share(net)
    # torch reads a raw MHA's out_proj.weight itself: never offered for swapping
    offered = {n for n, _, _ in ADAPTER.weight_layers(net)}
    assert "pool.out_proj" not in offered and "encoder.layers.0.linear1" in offered
    try:
        used = _run(net, act=False)["passes"][0]["weights_quantized_and_used_fraction"] or 0.0
    except AttributeError as exc:
        # out_proj swapped, but torch reads out_proj.weight raw: the model no longer runs
        assert "weight" in str(exc)
        used = 0.0
    assert used < threshold


def test_forward_coverage_sees_fused_bypass():
    """A swapped Linear that torch's fused encoder path skips is reported as not used (hooks
    would switch the fused path off and hide exactly this)."""
    from compress.calib.capture import capture_generic
    from compress.models.base import ModelHandle
    from compress.passes.ptq import forward_coverage

    class Shadow(nn.Linear):  # keeps a float .weight, as a fake-quant layer would
        pass

    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, HEADS, FF, dropout=0.0, batch_first=True).eval()
    old = layer.linear1
    layer.linear1 = Shadow(old.in_features, old.out_features)
    layer.linear1.load_state_dict(old.state_dict())
    x = torch.randn(2, 5, E)
    calib = capture_generic(layer, lambda m: m(x))
    handle = ModelHandle(transformer=layer, adapter=ADAPTER)
    with torch.no_grad():
        assert forward_coverage(handle, calib, ["linear1"]) == []
        ADAPTER.prepare(layer)  # unfused: the same module now runs
        assert forward_coverage(handle, calib, ["linear1"]) == ["linear1"]
    assert not layer.linear1.__dict__.get("forward")  # the wrapper is gone again


# --------------------------------------------------------------- saved output rebuilds exactly


def test_generic_output_restores_bit_equal(tmp_path):
    from accelerate import init_empty_weights

    from compress.io.load import _state_dict, own_memory_
    from compress.registry import get_pass

    torch.manual_seed(0)
    net = Net().eval()
    _run(net, act=False, out=tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / "compress_manifest.json").read_text())
    with warnings.catch_warnings(), init_empty_weights(include_buffers=False):
        warnings.simplefilter("ignore")
        skel = Net().eval()
    from compress.models.generic import restore_prepared

    restore_prepared(skel, manifest["prepared"])
    for p in manifest["passes"]:
        defn = get_pass(p["name"])
        defn.restore(skel, defn.config.model_validate(p["config"]), p["meta"])
    assert isinstance(skel.pool, UnfusedMultiheadAttention)
    missing, unexpected = skel.load_state_dict(_state_dict(tmp_path / "out"), strict=False,
                                               assign=True)
    assert not missing and not unexpected
    own_memory_(skel)
    own_memory_(net)
    xs, mask = _data()
    with torch.no_grad():
        assert torch.equal(skel.eval()(xs[1], mask), net(xs[1], mask))
