"""Depth pruning: whole blocks removed physically (diffusers families reload with their stock
class from the updated config, generic modules keep their structure cache in step), restored on
skeletons, skipped temporarily, and refused when the removal cannot work."""

from __future__ import annotations

import copy
import json
import math
from collections import OrderedDict

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
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
from compress.models.depth import (
    check_removal,
    removable,
    remove_blocks,
    restore_removed,
    without_blocks,
)
from compress.models.generic import _STRUCTURES, analyse_module, share_structure, structure_of
from compress.models.generic import ADAPTER as GENERIC

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")




def _reload(tr: nn.Module, path) -> nn.Module:
    """The stock class's from_pretrained; then fresh memory for the weights, as load_model does
    (mmapped tensors at odd offsets make oneDNN pick other kernels: last-bit differences)."""
    tr.save_pretrained(path)
    back = type(tr).from_pretrained(path).eval()
    own_memory_(back)
    return back


def _assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------ diffusers families


@pytest.mark.parametrize("family", FAMILIES)
def test_remove_one_block_per_list_reloads_with_the_stock_class(family, tmp_path):
    tr = build_tiny_pipeline(family).transformer
    adapter = adapter_for(tr)
    full = run_first_call(tr, family)
    before = {a: list(getattr(tr, a)) for a in adapter.block_lists}
    names = [f"{a}.0" for a in adapter.block_lists]  # SD3: block 0 is not its last
    assert set(names) <= set(removable(tr, adapter))
    meta = remove_blocks(tr, adapter, names)

    assert json.loads(json.dumps(meta)) == meta
    assert meta["removed"] == names
    assert meta["kept"] == [f"{a}.{i}" for a in adapter.block_lists
                            for i in range(1, len(before[a]))]
    for a, old in before.items():
        assert list(getattr(tr, a)) == old[1:]  # the same modules, renumbered
        assert meta["counts"][a] == len(old) - 1
        assert tr.config[adapter.layer_config_keys[a]] == len(old) - 1
        assert not any(k.startswith(f"{a}.{len(old) - 1}.") for k in tr.state_dict())
    if family == "sd3":  # block 0 was the only dual-attention block
        assert tuple(tr.config["dual_attention_layers"]) == ()
    pruned = run_first_call(tr, family)
    assert pruned.shape == full.shape and not torch.equal(pruned, full)

    back = _reload(tr, tmp_path)
    _assert_same_weights(back, tr)
    assert torch.equal(run_first_call(back, family), pruned)


def _tiny_sd3(num_layers: int = 4, dual: tuple[int, ...] = (0, 2)) -> SD3Transformer2DModel:
    torch.manual_seed(0)
    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=num_layers, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
        pooled_projection_dim=16, out_channels=4, pos_embed_max_size=8,
        dual_attention_layers=dual, qk_norm="rms_norm").eval()


def _sd3_inputs() -> dict:
    g = torch.Generator().manual_seed(1)
    return {"hidden_states": torch.randn(1, 4, 8, 8, generator=g),
            "encoder_hidden_states": torch.randn(1, 5, 16, generator=g),
            "pooled_projections": torch.randn(1, 16, generator=g),
            "timestep": torch.tensor([500.0])}


def _sd3_out(tr: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return tr(**_sd3_inputs(), return_dict=False)[0]


@pytest.mark.parametrize("drop, dual", [([1], (0, 1)), ([0, 2], ()), ([2], (0,))])
def test_sd3_dual_attention_layers_follow_their_blocks(drop, dual, tmp_path):
    tr = _tiny_sd3()
    adapter = adapter_for(tr)
    assert removable(tr, adapter) == [f"transformer_blocks.{i}" for i in range(3)]
    was = list(tr.transformer_blocks)
    remove_blocks(tr, adapter, [f"transformer_blocks.{i}" for i in drop])
    assert tr.config["num_layers"] == 4 - len(drop)
    assert tuple(tr.config["dual_attention_layers"]) == dual
    assert [b.attn2 is not None for b in tr.transformer_blocks] == \
        [i in (0, 2) for i in range(4) if i not in drop]
    assert list(tr.transformer_blocks) == [b for i, b in enumerate(was) if i not in drop]
    back = _reload(tr, tmp_path)
    assert type(back) is SD3Transformer2DModel
    assert tuple(back.config["dual_attention_layers"]) == dual
    _assert_same_weights(back, tr)
    assert torch.equal(_sd3_out(back), _sd3_out(tr))


def _tiny_flux() -> FluxTransformer2DModel:
    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=2, num_single_layers=3, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8,
        axes_dims_rope=(2, 2, 4)).eval()


@pytest.mark.parametrize("make, names", [
    (_tiny_flux, ["single_transformer_blocks.1", "transformer_blocks.0"]),
    (_tiny_sd3, ["transformer_blocks.1"]),
])
def test_restore_removed_on_meta_skeletons(make, names):
    tr = make()
    adapter = adapter_for(tr)
    original = dict(tr.config)
    meta = json.loads(json.dumps(remove_blocks(tr, adapter, names)))
    assert meta["removed"] == sorted(names, key=lambda n: n.startswith("single"))

    with init_empty_weights():
        old = type(tr).from_config(original)
    assert state_shapes(old) != state_shapes(tr)
    restore_removed(old, adapter, meta)
    assert state_shapes(old) == state_shapes(tr)
    assert all(p.is_meta for p in old.parameters())
    assert dict(old.config) == dict(tr.config)

    with init_empty_weights():
        new = type(tr).from_config(tr.config)
    blocks = [id(b) for _, b in adapter.blocks(new)]
    config = dict(new.config)
    restore_removed(new, adapter, meta)  # already pruned: nothing to do
    assert [id(b) for _, b in adapter.blocks(new)] == blocks and dict(new.config) == config
    assert state_shapes(new) == state_shapes(tr)

    with init_empty_weights():
        other = type(tr).from_config({**original, "num_layers": original["num_layers"] + 1})
    with pytest.raises(UserError, match="neither the pruned"):
        restore_removed(other, adapter, meta)


# ------------------------------------------------------------------ generic modules


class Blk(nn.Module):
    """Pre-norm attention + MLP block, optionally modulated by a conditioning vector."""

    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.mod = nn.Linear(d, 2 * d)

    def forward(self, h: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        z = self.n1(h)
        if c is not None:
            s, b = self.mod(c)[:, None].chunk(2, -1)
            z = z * (1 + s) + b
        q, k, v = self.qkv(z).chunk(3, -1)
        w = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)
        h = h + self.proj(w @ v)
        return h + self.fc2(nn.functional.gelu(self.fc1(self.n2(h))))


class Net(nn.Module):
    """Embed, blocks in ``kind`` of container, head."""

    def __init__(self, kind: str, d: int = 32) -> None:
        super().__init__()
        self.kind = kind
        self.inp, self.cond, self.head = nn.Linear(6, d), nn.Linear(1, d), nn.Linear(d, 6)
        if kind == "list":
            self.blocks = nn.ModuleList(Blk(d) for _ in range(4))
        elif kind == "named_seq":  # Sequential blocks take one input
            self.blocks = nn.Sequential(OrderedDict((n, Blk(d)) for n in ("in", "mid", "out")))
        elif kind == "stages":
            self.stages = nn.ModuleDict({"a": nn.ModuleList(Blk(d) for _ in range(2)),
                                         "b": nn.ModuleList(Blk(d) for _ in range(3))})
        elif kind == "dict":
            self.blocks = nn.ModuleDict({n: Blk(d) for n in ("x", "y", "z")})

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h, c = self.inp(x), self.cond(t[:, None])
        if self.kind == "named_seq":
            return self.head(self.blocks(h + c[:, None]))
        if self.kind == "stages":
            todo = [b for stage in self.stages.values() for b in stage]
        else:
            todo = self.blocks.values() if self.kind == "dict" else self.blocks
        for b in todo:
            h = b(h, c)
        return self.head(h)


def _net_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return torch.randn(2, 5, 6, generator=g), torch.rand(2, generator=g)


def _shapedit(seed: int = 0) -> ShapeDiT:
    torch.manual_seed(seed)
    return ShapeDiT(width=32, depth=3, heads=2).eval()


def _shapedit_inputs() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(2, 3, 32, 32, generator=g), torch.tensor([7, 800]), torch.tensor([5, 43])


def _make(kind: str, seed: int = 0) -> nn.Module:
    if kind == "shapedit":
        return _shapedit(seed)
    torch.manual_seed(seed)
    if kind == "root_seq":  # the model itself is the container; the head is renumbered too
        return nn.Sequential(nn.Linear(6, 32), *(Blk() for _ in range(3)), nn.Linear(32, 6)).eval()
    return Net(kind).eval()


GENERIC_CASES = {  # kind: (blocks before, names to drop, blocks after, old -> new renames)
    "list": (["blocks.0", "blocks.1", "blocks.2", "blocks.3"], ["blocks.1", "blocks.3"],
             ["blocks.0", "blocks.1"], {"blocks.0": "blocks.0", "blocks.2": "blocks.1"}),
    "shapedit": (["core.cells.0", "core.cells.1", "core.cells.2"], ["core.cells.0"],
                 ["core.cells.0", "core.cells.1"],
                 {"core.cells.1": "core.cells.0", "core.cells.2": "core.cells.1"}),
    "named_seq": (["blocks.in", "blocks.mid", "blocks.out"], ["blocks.mid"],
                  ["blocks.in", "blocks.out"], {"blocks.in": "blocks.in",
                                                "blocks.out": "blocks.out"}),
    "stages": (["stages.a.0", "stages.a.1", "stages.b.0", "stages.b.1", "stages.b.2"],
               ["stages.a.0", "stages.b.1"], ["stages.a.0", "stages.b.0", "stages.b.1"],
               {"stages.a.1": "stages.a.0", "stages.b.0": "stages.b.0",
                "stages.b.2": "stages.b.1"}),
    "root_seq": (["1", "2", "3"], ["2"], ["1", "2"], {"1": "1", "3": "2", "4": "3"}),
    "dict": (["blocks.x", "blocks.y", "blocks.z"], ["blocks.x"], ["blocks.y", "blocks.z"],
             {"blocks.y": "blocks.y", "blocks.z": "blocks.z"}),
}


def _inputs_for(kind: str) -> tuple:
    if kind == "root_seq":
        return _net_inputs()[:1]
    return _shapedit_inputs() if kind == "shapedit" else _net_inputs()


@pytest.mark.parametrize("kind", sorted(GENERIC_CASES))
def test_generic_removal_renames_the_structure_and_restores_on_a_fresh_instance(kind):
    blocks, drop, after, renames = GENERIC_CASES[kind]
    m, x = _make(kind), _inputs_for(kind)
    st = analyse_module(m, x)  # traced: roles from the data flow
    assert st.blocks == blocks and removable(m, GENERIC) == blocks
    roles = dict(st.roles)
    with torch.no_grad():
        full = m(*x)
    kept_blocks = [m.get_submodule(o) for o in renames]
    meta = remove_blocks(m, GENERIC, drop)
    assert meta["removed"] == drop and meta["kept"] == [o for o in renames if o in blocks]
    assert [m.get_submodule(n) for n in renames.values()] == kept_blocks

    now = structure_of(m)
    assert now is not st and st.blocks == blocks  # a new Structure, the old one untouched
    assert now.blocks == after and [n for n, _ in GENERIC.blocks(m)] == after
    layers = {n for n, mod in m.named_modules() if isinstance(mod, (nn.Linear, nn.Conv2d))}
    assert set(now.roles) == layers == set(now.reasons)
    for old, new in renames.items():
        for name, role in roles.items():
            if name.startswith(old + "."):
                assert now.roles[new + name[len(old):]] == role
    with torch.no_grad():
        pruned = m(*x)
    assert pruned.shape == full.shape and not torch.equal(pruned, full)

    fresh = _make(kind, seed=1)  # the user's original class, other weights
    restore_removed(fresh, GENERIC, json.loads(json.dumps(meta)))
    assert structure_of(fresh).blocks == after
    fresh.load_state_dict(m.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(fresh(*x), pruned)


# ------------------------------------------------------------------ without_blocks


def test_without_blocks_matches_a_pruned_copy_then_puts_everything_back():
    tr = build_tiny_pipeline("flux").transformer
    adapter = adapter_for(tr)
    names = ["transformer_blocks.1", "single_transformer_blocks.0"]
    config, keys, full = dict(tr.config), list(tr.state_dict()), run_first_call(tr, "flux")
    lists = [getattr(tr, a) for a in adapter.block_lists]
    ref = copy.deepcopy(tr)
    remove_blocks(ref, adapter, names)
    with without_blocks(tr, adapter, names):
        inside = run_first_call(tr, "flux")
        assert len(tr.transformer_blocks) == 1 and len(tr.single_transformer_blocks) == 1
        assert dict(tr.config) == config
    assert torch.equal(inside, run_first_call(ref, "flux")) and not torch.equal(inside, full)
    assert torch.equal(run_first_call(tr, "flux"), full)
    assert [getattr(tr, a) for a in adapter.block_lists] == lists  # the very same containers
    assert dict(tr.config) == config and list(tr.state_dict()) == keys
    with pytest.raises(RuntimeError, match="boom"), without_blocks(tr, adapter, names):
        raise RuntimeError("boom")
    assert [getattr(tr, a) for a in adapter.block_lists] == lists


def test_without_blocks_on_a_generic_module_leaves_its_structure_alone():
    m, x = _make("stages"), _net_inputs()
    st = analyse_module(m, x)
    with torch.no_grad():
        full = m(*x)
    ref = copy.deepcopy(m)
    share_structure(m, ref)  # as passes do: the copy shares the Structure object
    drop = ["stages.a.1", "stages.b.0"]
    remove_blocks(ref, GENERIC, drop)
    assert _STRUCTURES[m] is st and st.blocks == GENERIC_CASES["stages"][0]
    with torch.no_grad():
        with without_blocks(m, GENERIC, drop):
            inside = m(*x)
            assert _STRUCTURES[m] is st
        assert torch.equal(inside, ref(*x))
        assert torch.equal(m(*x), full)
    assert _STRUCTURES[m] is st and len(m.stages.a) == 2 and len(m.stages.b) == 3

    fresh = _make("root_seq")  # never analysed: the cache stays empty, the root gets its kids
    kids = list(fresh)
    with torch.no_grad(), without_blocks(fresh, GENERIC, ["1", "3"]):
        assert list(fresh) == [kids[0], kids[2], kids[4]] and fresh(x[0]).shape == (2, 5, 6)
    assert fresh not in _STRUCTURES and list(fresh) == kids


# ------------------------------------------------------------------ refusals


def test_check_removal_refusals_leave_the_model_untouched():
    sd3, flux = _tiny_sd3(), _tiny_flux()
    cases = [
        (sd3, ["transformer_blocks.9"], r"not blocks of this model.*transformer_blocks\.0"),
        (sd3, ["pos_embed"], "not blocks of this model"),
        (sd3, ["transformer_blocks.1", "transformer_blocks.1"], "more than once"),
        (sd3, ["transformer_blocks.3"], "last block.*context_pre_only"),
        (flux, ["transformer_blocks.0", "transformer_blocks.1"],
         "leave transformer_blocks with no block"),
        (flux, [f"single_transformer_blocks.{i}" for i in range(3)],
         "leave single_transformer_blocks with no block"),
    ]
    for tr, names, msg in cases:
        adapter, keys = adapter_for(tr), list(tr.state_dict())
        with pytest.raises(UserError, match=msg):
            check_removal(tr, adapter, names)
        with pytest.raises(UserError, match=msg):
            remove_blocks(tr, adapter, names)
        with pytest.raises(UserError, match=msg), without_blocks(tr, adapter, names):
            pass
        assert list(tr.state_dict()) == keys
    assert sd3.config["num_layers"] == 4 and flux.config["num_single_layers"] == 3
    check_removal(flux, adapter_for(flux), ["transformer_blocks.1", "single_transformer_blocks.2"])

    seq = _make("root_seq")
    with pytest.raises(UserError, match="leave the model with no block"):
        check_removal(seq, GENERIC, ["1", "2", "3"])
    m = _make("stages")
    with pytest.raises(UserError, match="leave stages.a with no block"):
        check_removal(m, GENERIC, ["stages.a.0", "stages.a.1"])
    check_removal(m, GENERIC, ["stages.a.0", "stages.b.1"])


def test_a_count_left_at_its_default_is_not_put_back_by_from_config():
    # a config saved without num_layers loads with it listed in _use_default_values; from_config
    # of the pruned config must build the pruned count, not the class default
    from compress.models import adapter_for

    cfg = dict(_tiny_flux().config)
    cfg["_use_default_values"] = ["num_layers"]
    tr = FluxTransformer2DModel.from_config(cfg)
    n = len(tr.transformer_blocks)
    remove_blocks(tr, adapter_for(tr), ["transformer_blocks.0"])
    again = FluxTransformer2DModel.from_config(tr.config)
    assert len(again.transformer_blocks) == n - 1
