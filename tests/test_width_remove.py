"""Width pruning: heads and feed-forward channels removed physically give exactly the original
model with their contributions zeroed at the out-projection, parameter counts shrink by what
the removed rows and columns held, pruned models reload (stock from_pretrained where the config
can say it, else skeleton + restore), and bad requests are refused."""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch
import torch.nn.functional as F
from accelerate import init_empty_weights
from tiny_pipelines import (
    FAMILIES,
    build_tiny_pipeline,
    run_first_call,
    state_shapes,
)
from torch import nn

from compress.demo.shapedit import ShapeDiT
from compress.errors import UserError
from compress.io.load import own_memory_
from compress.models import adapter_for
from compress.models.generic import ADAPTER as GENERIC
from compress.models.generic import analyse_module
from compress.models.width import STOCK_EXPRESSIBLE, remove, restore, stock_expressible, units

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")




def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _zeroed(model: nn.Module, found, keep: dict[str, list[int]]) -> nn.Module:
    """A copy of the original with the dropped elements' input columns of each out-projection
    zeroed (columns [offset + i * group, offset + (i + 1) * group) for a dropped element i)."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for u in found:
            if u.name not in keep:
                continue
            for layer in u.inputs:
                w = ref.get_submodule(layer).weight
                at = u.offset.get(layer, 0)
                for i in set(range(u.count)) - set(keep[u.name]):
                    w[:, at + i * u.group: at + (i + 1) * u.group] = 0
    return ref


def _dropped_params(model: nn.Module, found, keep: dict[str, list[int]]) -> int:
    """What removal must free: per dropped element, its rows of every output layer (all parts,
    with their bias), its columns of every input layer and its share of the sized norms."""
    total = 0
    for u in found:
        if u.name not in keep:
            continue
        gone = (u.count - len(keep[u.name])) * u.group
        for name in u.outputs:
            m = model.get_submodule(name)
            per_row = m.weight[0].numel() + (m.bias is not None)
            total += gone * u.parts.get(name, 1) * per_row
        for name in u.inputs:
            m = model.get_submodule(name)
            total += gone * m.weight.shape[0] * m.weight[0, 0].numel()
        for name in u.sized:
            total += gone * len(list(model.get_submodule(name).parameters(recurse=False)))
    return total


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    err = (got - want).abs().max().item()
    assert err <= 1e-4 * max(want.abs().max().item(), 1e-6), err


def _keep_sets(found, seed: int = 0) -> dict[str, list[int]]:
    """Non-uniform: head 0 dropped in every other attention, a random half of the channels in
    every other feed-forward, a random quarter in the rest (each unit its own subset)."""
    rng = random.Random(seed)
    keep, seen = {}, {"heads": 0, "channels": 0}
    for u in found:
        i = seen[u.kind]
        seen[u.kind] += 1
        if u.kind == "heads":
            if i % 2 == 0:
                keep[u.name] = list(range(1, u.count))
        else:
            n = u.count // 2 if i % 2 == 0 else u.count // 4
            keep[u.name] = sorted(rng.sample(range(u.count), n))
    return keep


# ------------------------------------------------------------------ what the units are


def test_units_of_every_family_name_what_shrinks():
    by_family = {}
    for family in FAMILIES:
        tr = build_tiny_pipeline(family).transformer
        by_family[family] = {u.name: u for u in units(tr, adapter_for(tr))}
    dit, pixart, sd3 = by_family["dit"], by_family["pixart"], by_family["sd3"]
    flux, sana = by_family["flux"], by_family["sana"]
    assert list(dit) == ["transformer_blocks.0.attn1", "transformer_blocks.0.ff",
                         "transformer_blocks.1.attn1", "transformer_blocks.1.ff"]
    u = dit["transformer_blocks.0.attn1"]
    assert (u.kind, u.block, u.count, u.group) == ("heads", "transformer_blocks.0", 2, 16)
    assert u.outputs == [f"transformer_blocks.0.attn1.to_{x}" for x in "qkv"]
    assert u.inputs == ["transformer_blocks.0.attn1.to_out.0"]
    u = dit["transformer_blocks.0.ff"]
    assert (u.kind, u.count, u.group) == ("channels", 128, 1)
    assert u.outputs == ["transformer_blocks.0.ff.net.0.proj"]
    assert u.inputs == ["transformer_blocks.0.ff.net.2"]

    assert pixart["transformer_blocks.1.attn2"].outputs[1] == "transformer_blocks.1.attn2.to_k"
    # SD3: joint attention (both streams), SD3.5's attn2, the last block is context_pre_only
    first, last = sd3["transformer_blocks.0.attn"], sd3["transformer_blocks.1.attn"]
    assert first.outputs[3:] == [f"transformer_blocks.0.attn.add_{x}_proj" for x in "qkv"]
    assert first.inputs == ["transformer_blocks.0.attn.to_out.0",
                            "transformer_blocks.0.attn.to_add_out"]
    assert last.inputs == ["transformer_blocks.1.attn.to_out.0"]
    assert "transformer_blocks.0.attn2" in sd3 and "transformer_blocks.1.attn2" not in sd3
    assert "transformer_blocks.0.ff_context" in sd3 and "transformer_blocks.1.ff_context" not in sd3
    assert all(not u.sized for u in sd3.values())  # rms_norm over head_dim stays as it is
    # FLUX single block: attention and mlp share proj_out, the mlp's columns after attention's
    a, m = flux["single_transformer_blocks.0.attn"], flux["single_transformer_blocks.0.mlp"]
    assert a.inputs == m.inputs == ["single_transformer_blocks.0.proj_out"]
    assert a.offset == {} and m.offset == {"single_transformer_blocks.0.proj_out": 32}
    assert m.outputs == ["single_transformer_blocks.0.proj_mlp"] and m.count == 128
    assert len(flux) == 2 * 3 + 2 * 2  # double: attn, ff, ff_context; single: attn, mlp
    # Sana: GLUMBConv's expansion and depthwise convs hold [x | gate] halves
    ff = sana["transformer_blocks.0.ff"]
    assert ff.count == 80 and ff.inputs == ["transformer_blocks.0.ff.conv_point"]
    assert ff.parts == {"transformer_blocks.0.ff.conv_inverted": 2,
                        "transformer_blocks.0.ff.conv_depth": 2}
    assert sana["transformer_blocks.0.attn1"].group == 16


# ------------------------------------------------------------------ diffusers families


@pytest.mark.parametrize("family", FAMILIES)
def test_removal_equals_zeroed_contributions_and_reloads_through_restore(family):
    tr = build_tiny_pipeline(family).transformer
    adapter = adapter_for(tr)
    original = dict(tr.config)
    found = units(tr, adapter)
    keep = _keep_sets(found)
    want = run_first_call(_zeroed(tr, found, keep), family)
    full = run_first_call(tr, family)
    before, drop = _params(tr), _dropped_params(tr, found, keep)

    meta = remove(tr, adapter, keep)
    assert json.loads(json.dumps(meta)) == meta
    assert meta["keep"] == keep
    assert meta["counts_after"] == {k: len(v) for k, v in keep.items()}
    assert meta["params_before"] == before and meta["params_after"] == _params(tr) == before - drop
    assert not meta["stock_loadable"] and dict(tr.config) == original  # heads: no config key
    got = run_first_call(tr, family)
    _close(got, want)
    assert (got - full).abs().max() > 1e-3  # something was removed
    for u in found:
        if u.kind == "heads" and u.name in keep:
            attn = tr.get_submodule(u.name)
            assert attn.heads == len(keep[u.name]) and attn.inner_dim == attn.heads * u.group
    assert {u.name for u in units(tr, adapter)} == {u.name for u in found}

    skeleton = type(tr).from_config(original).eval()  # original shapes, other weights
    restore(skeleton, adapter, json.loads(json.dumps(meta)))
    skeleton.load_state_dict(tr.state_dict(), strict=True)
    assert torch.equal(run_first_call(skeleton, family), got)
    restore(skeleton, adapter, meta)  # already pruned: nothing to do
    assert state_shapes(skeleton) == state_shapes(tr)


def test_restore_on_meta_skeletons_and_refusal_of_other_shapes():
    tr = build_tiny_pipeline("flux").transformer
    adapter, original = adapter_for(tr), dict(tr.config)
    keep = {"single_transformer_blocks.1.attn": [0, 3], "single_transformer_blocks.1.mlp":
            list(range(0, 128, 3)), "transformer_blocks.0.ff_context": [5, 9]}
    meta = remove(tr, adapter, keep)
    assert tr.single_transformer_blocks[1].proj_out.in_features == 2 * 8 + 43
    assert tr.single_transformer_blocks[1].proj_out._tp_packed_row_blocks == [16, 43]
    assert tr.single_transformer_blocks[1].mlp_hidden_dim == 43
    with init_empty_weights():
        sk = type(tr).from_config(original)
    restore(sk, adapter, meta)
    assert state_shapes(sk) == state_shapes(tr) and all(p.is_meta for p in sk.parameters())
    sk.load_state_dict(tr.state_dict(), assign=True)
    assert torch.equal(run_first_call(sk.eval(), "flux"), run_first_call(tr, "flux"))

    with init_empty_weights():
        other = type(tr).from_config({**original, "num_attention_heads": 2,
                                      "attention_head_dim": 16})
    with pytest.raises(UserError, match="neither the pruned"):
        restore(other, adapter, meta)


@pytest.mark.parametrize("family, change", [("pixart", {"activation_fn": "geglu"}),
                                            ("sana", {"qk_norm": "rms_norm_across_heads"})])
def test_gated_feed_forward_halves_and_norms_across_heads(family, change):
    base = build_tiny_pipeline(family).transformer
    config = {k: v for k, v in base.config.items() if k != "_use_default_values"} | change
    torch.manual_seed(2)
    tr = type(base).from_config(config).eval()
    adapter = adapter_for(tr)
    found = units(tr, adapter)
    keep = _keep_sets(found, seed=3)
    want = run_first_call(_zeroed(tr, found, keep), family)
    before, drop = _params(tr), _dropped_params(tr, found, keep)
    meta = remove(tr, adapter, keep)
    assert meta["params_after"] == before - drop
    got = run_first_call(tr, family)
    if family == "pixart":  # GEGLU: [hidden | gate] rows, both halves sliced alike
        ff = {u.name: u for u in found}["transformer_blocks.0.ff"]
        assert ff.parts == {"transformer_blocks.0.ff.net.0.proj": 2}
        assert tr.transformer_blocks[0].ff.net[0].proj.out_features == 2 * 64
        _close(got, want)
        assert meta["inexact"] == []
    else:  # a q/k norm over all heads shrinks with them; its statistic changes (inexact)
        attn = {u.name: u for u in found}["transformer_blocks.0.attn1"]
        assert attn.sized == ["transformer_blocks.0.attn1.norm_q", "transformer_blocks.0.attn1.norm_k"]
        assert tuple(tr.transformer_blocks[0].attn1.norm_q.weight.shape) == (16,)
        assert meta["inexact"] == [u for u in keep if u.endswith(("attn1", "attn2"))]
        assert torch.isfinite(got).all()
    skeleton = type(tr).from_config(config)
    restore(skeleton, adapter, meta)
    skeleton.load_state_dict(tr.state_dict())
    assert torch.equal(run_first_call(skeleton.eval(), family), got)


def _uniform_sana_keep(found) -> dict[str, list[int]]:
    rng = random.Random(1)
    keep = {}
    for u in found:
        if u.name.endswith(".attn2"):
            keep[u.name] = [1]
        elif u.kind == "channels":
            keep[u.name] = sorted(rng.sample(range(u.count), 40))  # mlp_ratio 2.5 -> 1.25
    return keep


def test_uniform_sana_widths_reload_with_the_stock_class(tmp_path):
    tr = build_tiny_pipeline("sana").transformer
    adapter, original = adapter_for(tr), dict(tr.config)
    found = units(tr, adapter)
    keep = _uniform_sana_keep(found)
    want = run_first_call(_zeroed(tr, found, keep), "sana")
    meta = remove(tr, adapter, keep)
    assert meta["stock_loadable"]
    assert meta["config"] == {"num_cross_attention_heads": 1, "mlp_ratio": 1.25}
    assert tr.config["num_cross_attention_heads"] == 1 and tr.config["mlp_ratio"] == 1.25
    got = run_first_call(tr, "sana")
    _close(got, want)

    tr.save_pretrained(tmp_path)
    back = type(tr).from_pretrained(tmp_path).eval()
    own_memory_(back)  # fresh memory, as load_model does (mmapped tensors: last-bit changes)
    assert state_shapes(back) == state_shapes(tr)
    assert torch.equal(run_first_call(back, "sana"), got)
    restore(back, adapter, meta)  # built from the updated config: nothing to do
    assert state_shapes(back) == state_shapes(tr)

    old = type(tr).from_config(original).eval()  # the original config works too
    restore(old, adapter, meta)
    old.load_state_dict(tr.state_dict())
    assert old.config["mlp_ratio"] == 1.25 and torch.equal(run_first_call(old, "sana"), got)


@pytest.mark.parametrize("family", ["dit", "pixart", "sd3", "flux", "sana"])
def test_uniform_head_removal_is_not_stock_loadable_where_heads_set_the_width(family):
    tr = build_tiny_pipeline(family).transformer
    adapter, original = adapter_for(tr), dict(tr.config)
    found = units(tr, adapter)
    everything = {u.name: list(range(u.count)) for u in found}
    meta = remove(tr, adapter, everything)  # keeping all: nothing changes, stock loadable
    assert meta["stock_loadable"] and meta["params_after"] == meta["params_before"]
    self_attn = {u.name: list(range(1, u.count)) for u in found
                 if u.kind == "heads" and not u.name.endswith("attn2")}
    meta = remove(tr, adapter, self_attn)
    assert not meta["stock_loadable"] and meta["config"] == {} and dict(tr.config) == original
    if family != "sana":  # feed-forward widths are fixed multiples of the width
        tr = build_tiny_pipeline(family).transformer
        half = {u.name: list(range(u.count // 2)) for u in units(tr, adapter)
                if u.kind == "channels"}
        meta = remove(tr, adapter, half)
        assert not meta["stock_loadable"] and dict(tr.config) == original
    assert family in STOCK_EXPRESSIBLE and stock_expressible(family).startswith(
        "cross-attention" if family == "sana" else "nothing")


# ------------------------------------------------------------------ a user's own modules


def _shapedit(seed: int = 0) -> ShapeDiT:
    torch.manual_seed(seed)
    return ShapeDiT(width=64, depth=2, heads=2).eval()


def _shapedit_inputs() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(2, 3, 32, 32, generator=g), torch.tensor([7, 800]), torch.tensor([5, 43])


def test_shapedit_feed_forward_channels_and_restore_on_a_fresh_instance():
    m, x = _shapedit(), _shapedit_inputs()
    analyse_module(m, x)
    found = units(m, GENERIC)
    by = {u.name: u for u in found}
    assert list(by) == ["core.cells.0.attn", "core.cells.0.ff", "core.cells.1.attn",
                        "core.cells.1.ff"]
    a = by["core.cells.0.attn"]
    assert (a.kind, a.count, a.group, a.owner, a.attr) == ("heads", 2, 32, "core.cells.0", "heads")
    assert a.outputs == ["core.cells.0.lin_a"] and a.parts == {"core.cells.0.lin_a": 3}
    assert a.inputs == ["core.cells.0.lin_b"]
    assert (by["core.cells.1.ff"].count, by["core.cells.1.ff"].inputs) == (256, ["core.cells.1.lin_d"])

    keep = {u: k for u, k in _keep_sets(found).items() if u.endswith(".ff")}
    with torch.no_grad():
        want = _zeroed(m, found, keep)(*x)
    before, drop = _params(m), _dropped_params(m, found, keep)
    meta = remove(m, GENERIC, keep)
    assert meta["params_after"] == before - drop and not meta["stock_loadable"]
    with torch.no_grad():
        got = m(*x)
    _close(got, want)
    fresh = _shapedit(seed=1)  # the user's class, never analysed: meta carries the layout
    restore(fresh, GENERIC, json.loads(json.dumps(meta)))
    fresh.load_state_dict(m.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(fresh(*x), got)


def test_shapedit_heads_removed_compute_the_zeroed_head_model():
    """ShapeDiT's Cell takes the head width from its q/k/v rows, so it runs with fewer heads and
    computes what the original computes with the dropped head's out-projection columns zeroed."""
    m, x = _shapedit(), _shapedit_inputs()
    analyse_module(m, x)
    ref = copy.deepcopy(m)
    with torch.no_grad():
        ref.core.cells[0].lin_b.weight[:, :32] = 0  # head 0 of 2 (head width 32)
        want = ref(*x)
    remove(m, GENERIC, {"core.cells.0.attn": [1]})
    assert m.core.cells[0].heads == 1 and m.core.cells[0].lin_a.out_features == 96
    with torch.no_grad():
        got = m(*x)
    assert (got - want).abs().max() < 1e-5


class Attn(nn.Module):
    """Fused-qkv self-attention whose forward takes its head count from ``num_heads`` (or, with
    ``counted=False``, from nothing: a fixed head width of 8)."""

    def __init__(self, d: int, heads: int, counted: bool = True) -> None:
        super().__init__()
        if counted:
            self.num_heads = heads
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        split = (3, self.num_heads, -1) if hasattr(self, "num_heads") else (3, -1, 8)
        q, k, v = self.qkv(h).unflatten(-1, split).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


class Layer(nn.Module):
    def __init__(self, d: int, heads: int, counted: bool) -> None:
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = Attn(d, heads, counted)
        self.fc1, self.fc2 = nn.Linear(d, 3 * d), nn.Linear(3 * d, d)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.attn(self.n1(h))
        return h + self.fc2(F.gelu(self.fc1(self.n2(h))))


class Own(nn.Module):
    def __init__(self, counted: bool = True, d: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.inp, self.head = nn.Linear(6, d), nn.Linear(d, 6)
        self.layers = nn.ModuleList(Layer(d, heads, counted) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for layer in self.layers:
            h = layer(h)
        return self.head(h)


def _own(counted: bool = True, seed: int = 0) -> tuple[Own, torch.Tensor]:
    torch.manual_seed(seed)
    m = Own(counted).eval()
    x = torch.randn(2, 7, 6, generator=torch.Generator().manual_seed(4))
    analyse_module(m, (x,))
    return m, x


@pytest.mark.parametrize("counted", [True, False])
def test_own_module_heads_from_an_attribute_or_the_recipe(counted):
    m, x = _own(counted)
    if not counted:
        with pytest.raises(UserError, match=r'layers\.0\.attn.*prune_width\.heads: \{"layers\.0'
                                            r'\.attn": N\}'):
            units(m, GENERIC)
    counts = None if counted else {"re:layers\\.\\d+\\.attn": 4}
    found = units(m, GENERIC, counts)
    by = {u.name: u for u in found}
    assert sorted(by) == sorted([f"layers.{i}.attn" for i in range(3)] +
                                [f"layers.{i}" + ".ff" for i in range(3)])
    assert (by["layers.1.attn"].count, by["layers.1.attn"].group) == (4, 8)
    assert by["layers.1.attn"].attr == ("num_heads" if counted else None)
    keep = {"layers.0.attn": [1, 2, 3], "layers.1.attn": [0, 3], "layers.2.ff": [0, 5, 17, 95]}
    with torch.no_grad():
        want = _zeroed(m, found, keep)(x)
    before, drop = _params(m), _dropped_params(m, found, keep)
    meta = remove(m, GENERIC, keep, head_counts=counts)
    assert meta["params_after"] == before - drop
    if counted:
        assert [layer.attn.num_heads for layer in m.layers] == [3, 2, 4]
    with torch.no_grad():
        got = m(x)
    _close(got, want)
    fresh, _ = _own(counted, seed=5)
    restore(fresh, GENERIC, json.loads(json.dumps(meta)))
    fresh.load_state_dict(m.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(x), got)


def _mha(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, width: int) -> torch.Tensor:
    """Attention over heads of ``width`` channels, however many there are."""
    q, k, v = (t.unflatten(-1, (-1, width)).transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


class CrossGlu(nn.Module):
    """Self- and cross-attention (fused k/v) and a SwiGLU, all held by the block itself; the
    head widths are plain numbers the toolkit cannot read as head counts."""

    def __init__(self, width_self: int, d: int = 16, dc: int = 12) -> None:
        super().__init__()
        self.width_self = width_self
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(d, d) for _ in range(4))
        self.xq, self.xo, self.xkv = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(dc, 2 * d)
        self.g, self.u, self.dn = nn.Linear(d, 40), nn.Linear(d, 40), nn.Linear(40, d)

    def forward(self, h: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        h = h + self.wo(_mha(self.wq(h), self.wk(h), self.wv(h), self.width_self))
        k, v = self.xkv(ctx).chunk(2, -1)
        h = h + self.xo(_mha(self.xq(h), k, v, 8))
        return h + self.dn(F.silu(self.g(h)) * self.u(h))


class CrossNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.head = nn.Linear(4, 16), nn.Linear(16, 4)
        self.blocks = nn.ModuleList(CrossGlu(w) for w in (8, 4, 8))

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for b in self.blocks:
            h = b(h, ctx)
        return self.head(h)


def test_own_cross_attention_with_fused_kv_and_swiglu_channels():
    torch.manual_seed(0)
    m = CrossNet().eval()
    g = torch.Generator().manual_seed(6)
    x = (torch.randn(2, 9, 4, generator=g), torch.randn(2, 5, 12, generator=g))
    analyse_module(m, x)
    counts = {"re:blocks\\.\\d+": 2, "blocks.1.attn": 4}  # the unit name wins over the regex
    by = {u.name: u for u in units(m, GENERIC, counts)}
    assert sorted(by) == sorted(f"blocks.{i}.{w}" for i in range(3)
                                for w in ("attn", "cross_attn", "ff"))
    x2 = by["blocks.0.cross_attn"]
    assert (x2.count, x2.group, x2.inputs) == (2, 8, ["blocks.0.xo"])
    assert x2.outputs == ["blocks.0.xq", "blocks.0.xkv"] and x2.parts == {"blocks.0.xkv": 2}
    assert (by["blocks.1.attn"].count, by["blocks.1.attn"].group) == (4, 4)
    assert by["blocks.2.ff"].outputs == ["blocks.2.g", "blocks.2.u"]
    keep = {"blocks.0.cross_attn": [1], "blocks.1.attn": [0, 2, 3],
            "blocks.2.ff": list(range(0, 40, 3))}
    found = list(by.values())
    with torch.no_grad():
        want = _zeroed(m, found, keep)(*x)
        drop = _dropped_params(m, found, keep)
        meta = remove(m, GENERIC, keep, head_counts=counts)
        _close(m(*x), want)
    assert meta["params_after"] == meta["params_before"] - drop
    assert m.blocks[0].xkv.out_features == 16 and m.blocks[2].dn.in_features == 14


# ------------------------------------------------------------------ refusals


def test_bad_keep_sets_are_refused_and_leave_the_model_untouched():
    tr = build_tiny_pipeline("dit").transformer
    adapter, shapes = adapter_for(tr), state_shapes(tr)
    cases = [
        ({"transformer_blocks.0.attn1": []}, r"empty; keep at least 1 of its 2 heads"),
        ({"transformer_blocks.7.ff": [0]}, r"not width units.*transformer_blocks\.0\.attn1"),
        ({"transformer_blocks.0.ff": [0, 128]}, r"\[128\] out of range.*128 channels \(0\.\.127"),
        ({"transformer_blocks.0.attn1": [-1]}, "out of range"),
        ({"transformer_blocks.0.attn1": [1, 1]}, "index twice"),
        ({"transformer_blocks.0.attn1": "0"}, "list of heads indices"),
        (["transformer_blocks.0.attn1"], "must map unit names"),
    ]
    for keep, msg in cases:
        with pytest.raises(UserError, match=msg):
            remove(tr, adapter, keep)
        assert state_shapes(tr) == shapes
    assert tr.transformer_blocks[0].attn1.heads == 2
