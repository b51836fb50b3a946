"""to_moe and the MoE runtime: with every expert chosen the pair is the dense feed-forward; the
sparse runtime computes what a dense per-token reference computes; the least-squares router
beats random routing; every family's output reloads with the run's images; params_active
matches a count from forward hooks; a user's module converts and restores; distill trains the
routers with the balance loss; PTQ quantises the experts; bad configs are refused first."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from tiny_pipelines import FAMILIES
from torch import nn

import compress
from compress.errors import UserError
from compress.modules import moe

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
TINY = {"calibration": {"num_prompts": 2, "steps": 3},
        "eval": {"num_prompts": 2, "steps": 3, "latency": False}}


def _recipe(*more, **cfg) -> dict:
    return {"name": "m", **TINY, "passes": [{"to_moe": cfg}, *more]}


class _FFN(nn.Module):
    def __init__(self, d=16, h=48, gated=False):
        super().__init__()
        self.gated = gated
        self.up = nn.Linear(d, h * (2 if gated else 1))
        self.down = nn.Linear(h, d)

    def forward(self, x):
        z = self.up(x)
        if self.gated:
            a, g = z.chunk(2, dim=-1)
            z = a * torch.nn.functional.silu(g)
        else:
            z = torch.nn.functional.gelu(z)
        return self.down(z)


def _pair(ffn: _FFN, experts: int, top_k: int, shared_idx, groups, router=None):
    from compress.models.width_units import Unit
    from compress.moe import convert

    h = ffn.down.in_features
    u = Unit("m", "channels", "", h, 1, ["up"], ["down"], parts={"up": 2} if ffn.gated else {})
    spec = convert.spec_of(ffn, u)
    d = ffn.up.in_features
    router = router or (torch.randn(experts, d), torch.zeros(experts))
    convert.convert(ffn, spec, shared_idx, groups, top_k, False, router, None)
    return ffn


@pytest.mark.parametrize("gated", [False, True])
def test_all_experts_chosen_is_the_dense_ffn_and_top_k_matches_a_dense_reference(gated):
    torch.manual_seed(0)
    dense = _FFN(gated=gated)
    x = torch.randn(3, 10, 16)
    want = dense(x)
    perm = torch.randperm(48).tolist()
    shared, groups = perm[:8], [perm[8 + 10 * i:18 + 10 * i] for i in range(4)]
    full = _pair(copy.deepcopy(dense), 4, 4, shared, groups)
    assert isinstance(full.up, moe.MoEIn) and isinstance(full.down, moe.MoEOut)
    assert torch.allclose(full(x), want, atol=1e-5)
    # top 2 of 4: each token's output is the dense FFN with the other experts' channels zeroed
    w, b = torch.randn(4, 16), torch.randn(4)
    sparse = _pair(copy.deepcopy(dense), 4, 2, shared, groups, (w, b))
    got = sparse(x)
    top = (x.reshape(-1, 16) @ w.T + b).topk(2, dim=-1).indices
    ref = []
    for t, xt in enumerate(x.reshape(-1, 16)):
        keep = set(shared) | {c for e in top[t].tolist() for c in groups[e]}
        mask = torch.tensor([c in keep for c in range(48)], dtype=torch.float32)
        z = dense.up(xt)
        if gated:
            a, g = z.chunk(2)
            z = a * torch.nn.functional.silu(g)
        else:
            z = torch.nn.functional.gelu(z)
        ref.append(dense.down(z * mask))
    assert torch.allclose(got.reshape(-1, 16), torch.stack(ref), atol=1e-5)
    # the gate's value is one; its gradient reaches the router
    sparse.zero_grad()
    sparse(x).pow(2).sum().backward()
    assert sparse.up.router.weight.grad.abs().sum() > 0
    assert all(e.weight.grad is not None for e in sparse.up.experts)


def test_least_squares_router_beats_random_routing():
    from compress.moe import split

    torch.manual_seed(1)
    dense = _FFN(h=64)
    with torch.no_grad():  # channels that fire for different input directions
        dense.up.weight.mul_(3)
    x = torch.randn(4096, 16)
    acts = torch.nn.functional.gelu(dense.up(x)).detach()
    imp = acts.pow(2).mean(0) * dense.down.weight.pow(2).sum(0)
    shared_idx, groups = split.assign("coactivation", imp, dense.up.weight.detach(), acts, 0, 8,
                                      0)
    assert sorted(i for g in groups for i in g) == list(range(64))
    assert all(len(g) == 8 for g in groups)
    fit = split.router_lstsq(x, split.contribution(acts, dense.down.weight.detach(), groups))
    want = dense(x)

    def err(router):
        m = _pair(copy.deepcopy(dense), 8, 2, shared_idx, groups, router)
        with torch.no_grad():
            return float((m(x) - want).pow(2).mean() / want.pow(2).mean())

    rand = err((torch.randn(8, 16), torch.zeros(8)))
    fitted = err(fit)
    assert fitted < 0.7 * rand, (fitted, rand)


def test_balanced_kmeans_groups_equal_sizes_and_finds_planted_clusters():
    from compress.moe.split import balanced_kmeans

    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 32, generator=g) * 5
    feats = torch.cat([centers[i] + 0.1 * torch.randn(6, 32, generator=g) for i in range(4)])
    groups = balanced_kmeans(feats, 4, [6, 6, 6, 6], seed=0)
    assert sorted(sorted(gr) for gr in groups) == [list(range(6 * i, 6 * i + 6)) for i in range(4)]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_converts_and_reloads_with_the_run_images(family, tiny_pipeline_dir,
                                                               tmp_path, monkeypatch):
    monkeypatch.setenv("DIT_COMPRESS_CACHE", str(tmp_path / "cache"))
    src = str(tiny_pipeline_dir(family))
    rep = compress.run_recipe(_recipe(experts=4, top_k=1, shared=0.25, split="kmeans",
                                      router_timestep=True), src, tmp_path / "o")
    p = rep["passes"][0]
    assert p["feedforwards"] >= 1 and p["ffn_active_fraction"] < 0.5
    ev = rep["eval"]
    from compress.models import load_model

    ours = compress.load_pipeline(tmp_path / "o")
    gen = load_model(src).adapter.generate
    got = gen(ours, ev["prompts"], ev["seeds"], ev["steps"], ev["guidance"], ev["resolution"])
    assert np.array_equal(got, rep["_student_images"])
    assert rep["size"]["params_active"] < rep["size"]["params_total"]
    assert rep["moe_load"]["share_per_timestep_group"]  # the timestep reached the routers


def _hook_count(tr, blocks, dense_rows, run) -> float:
    """Weights a token does not run, counted with hooks during ``run()``: each routed block's
    rows against the rows its attn1.to_q sees in the original; each expert's rows against its
    feed-forward's tokens."""
    rows: dict[str, int] = {}
    hooks = []

    def count(key):
        def hook(_m, a, _o):
            rows[key] = rows.get(key, 0) + a[0].reshape(-1, a[0].shape[-1]).shape[0]
        return hook

    for b in blocks:
        hooks.append(tr.get_submodule(b + ".attn1.to_q").register_forward_hook(count(b)))
    pairs = [(n, m) for n, m in tr.named_modules()
             if isinstance(m, moe.MoEIn) and m.router is not None]
    for name, m in pairs:
        hooks.append(m.register_forward_hook(count(name)))
        for e, lin in enumerate(m.experts):
            hooks.append(lin.register_forward_hook(count(f"{name}.{e}")))
    run()
    for h in hooks:
        h.remove()
    inactive = 0.0
    for b in blocks:
        frac = rows.get(b, 0) / dense_rows[b]
        inactive += (1 - frac) * sum(p.numel() for p in tr.get_submodule(b).parameters())
        for name, m in pairs:
            if name.startswith(b + ".") and rows.get(name):
                for e in range(len(m.experts)):
                    inactive += frac * m.route.expert_params[e] * \
                        (1 - rows.get(f"{name}.{e}", 0) / rows[name])
    return inactive


def test_params_active_matches_a_count_from_forward_hooks(tiny_pipeline_dir, tmp_path,
                                                          monkeypatch):
    monkeypatch.setenv("DIT_COMPRESS_CACHE", str(tmp_path / "cache"))
    src = str(tiny_pipeline_dir("pixart"))
    rec = _recipe({"route_blocks": {"group": 2, "keep": 1, "router_timestep": False}},
                  experts=4, top_k=2, shared=0.0, split="taylor")
    rep = compress.run_recipe(rec, src, tmp_path / "o")
    from compress.models import load_model
    from compress.modules import mob

    ev = rep["eval"]
    args = (ev["prompts"], ev["seeds"], ev["steps"], ev["guidance"], ev["resolution"])
    orig = load_model(src)
    blocks = [n for n, _ in orig.adapter.blocks(orig.transformer)]
    dense: dict[str, int] = {}
    for b in blocks:
        orig.transformer.get_submodule(b + ".attn1.to_q").register_forward_hook(
            lambda _m, a, _o, b=b: dense.__setitem__(
                b, dense.get(b, 0) + a[0].reshape(-1, a[0].shape[-1]).shape[0]))
    orig.adapter.generate(orig.pipeline, *args)
    ours = compress.load_pipeline(tmp_path / "o")
    tr = ours.transformer
    total = sum(p.numel() for p in tr.parameters())
    counted = _hook_count(tr, blocks, dense, lambda: orig.adapter.generate(ours, *args))
    assert rep["size"]["params_active"] == pytest.approx(total - counted, rel=1e-6)
    # routers that send samples different ways (the trained start here is static)
    with torch.no_grad():
        for g in tr.block_routers:
            g.weight.normal_(0, 5)
    moe.collect(tr)
    mob.collect(tr)
    counted = _hook_count(tr, blocks, dense, lambda: orig.adapter.generate(ours, *args))
    assert 0 < min(mob.run_fractions(tr).values()) < 1  # the count is not trivial
    assert mob.inactive_params(tr) == pytest.approx(counted, rel=1e-6)


def _shapedit():
    from compress.demo.shapedit import ShapeDiT

    torch.manual_seed(0)
    return ShapeDiT(width=64, depth=2, heads=2).eval()


def _calibrate(mod):
    from compress.demo.shapedit import sample_seeds

    sample_seeds(mod, [11, 12], steps=4)


def test_own_module_converted_trained_and_restored(tmp_path):
    """ShapeDiT's MLP is written inline in its block (lin_c, gelu, lin_d): it still converts;
    distill then trains experts and routers; the output reloads onto a fresh instance."""
    work = _shapedit()
    x = (torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3)),
         torch.tensor([7, 800]), torch.tensor([5, 432]))
    rec = _recipe({"distill": {"steps": 4, "batch": 2, "checkpoint_every": 0, "lr": 1e-3}},
                  experts=4, top_k=1, shared=0.25, split="coactivation", router_timestep=True)
    rep = compress.run_recipe(rec, model=work, calibrate_fn=_calibrate, out=tmp_path / "o",
                              inplace=True)
    p = rep["passes"][0]
    assert p["feedforwards"] == 2 and p["timestep_argument"] == "t"
    assert p["timestep_scale"] == 1000.0
    assert rep["passes"][1]["loss_parts_last"]["balance"] > 0
    assert isinstance(work.core.cells[0].lin_c, moe.MoEIn)
    fresh = compress.load_module(tmp_path / "o", _shapedit())
    with torch.no_grad():
        assert torch.equal(fresh(*x), work(*x))


def test_experts_quantise_like_any_linear(tiny_pipeline_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("DIT_COMPRESS_CACHE", str(tmp_path / "cache"))
    src = str(tiny_pipeline_dir("sd3"))
    rep = compress.run_recipe(_recipe({"ptq": {"weights": {"bits": 8}}}, experts=4, top_k=2),
                              src, tmp_path / "o")
    ours = compress.load_pipeline(tmp_path / "o")
    pair = next(m for m in ours.transformer.modules() if isinstance(m, moe.MoEIn))
    assert all(not isinstance(e, nn.Linear) for e in pair.experts)  # replaced by int8 layers
    assert isinstance(pair.router, nn.Linear)  # routers stay in full precision
    ev = rep["eval"]
    from compress.models import load_model

    got = load_model(src).adapter.generate(ours, ev["prompts"], ev["seeds"], ev["steps"],
                                           ev["guidance"], ev["resolution"])
    assert np.array_equal(got, rep["_student_images"])


def test_bad_configs_are_refused_before_any_work(tiny_pipeline_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("DIT_COMPRESS_CACHE", str(tmp_path / "cache"))
    src = str(tiny_pipeline_dir("pixart"))
    for bad, msg in [({"experts": 4, "top_k": 5}, "more than experts"),
                     ({"include": ["re:("]}, "bad regex"),
                     ({"include": ["transformer_blocks.9.ff"]}, "selects no feed-forward"),
                     ({"experts": 200}, "fewer than experts")]:
        with pytest.raises(UserError, match=msg):
            compress.run_recipe(_recipe(**bad), src, tmp_path / "o")
    assert not (tmp_path / "o").exists() and not (tmp_path / "cache").exists()
    with pytest.raises(UserError, match="after .ptq. quantized it"):
        compress.run_recipe({"name": "m", **TINY, "passes": [
            {"ptq": {"weights": {"bits": 8}}}, {"to_moe": {"experts": 2}}]}, src, tmp_path / "o")


@pytest.mark.parametrize("form", ["never", "always"])
@pytest.mark.parametrize("act", ["gelu-approximate", "geglu", "swiglu", "gelu"])
def test_packed_diffusers_feedforward_matches_its_dense_reference(act, form, monkeypatch):
    """A diffusers FeedForward converts to the packed pair (the activation applied per expert,
    no full-width hidden tensor): all experts chosen is the dense layer; top 2 is the dense
    layer with the other experts' hidden channels zeroed, token by token. The same in the
    sparse form and the dense masked one (small layers, torch.compile)."""
    monkeypatch.setenv("DIT_COMPRESS_MOE_DENSE", form)
    from diffusers.models.attention import FeedForward

    from compress.models.width_units import Unit
    from compress.moe import convert

    torch.manual_seed(0)
    holder = nn.Module()
    holder.ff = FeedForward(16, mult=3, activation_fn=act)
    dense = copy.deepcopy(holder.ff)
    x = torch.randn(2, 7, 16)
    perm = torch.randperm(48).tolist()
    shared, groups = perm[:8], [perm[8 + 10 * i:18 + 10 * i] for i in range(4)]
    w, b = torch.randn(4, 16), torch.randn(4)
    got = {}
    for k in (4, 2):
        h = copy.deepcopy(holder)
        parts = 2 if act in ("geglu", "swiglu") else 1
        u = Unit("ff", "channels", "", 48, 1, ["ff.net.0.proj"], ["ff.net.2"],
                 parts={"ff.net.0.proj": parts} if parts > 1 else {})
        spec = convert.spec_of(h, u)
        assert spec["out"]["packed"] and spec["ins"][0]["name"] == "ff.net.0"
        convert.convert(h, spec, shared, groups, k, False, (w, b), None)
        with torch.no_grad():
            got[k] = h.ff(x)
        assert h.ff.net[0].route.mode == ("dense" if form == "always" else "sparse")
    assert torch.allclose(got[4], dense(x), atol=1e-5)
    top = (x.reshape(-1, 16) @ w.T + b).topk(2, dim=-1).indices
    hid = dense.net[0](x.reshape(-1, 16))
    mask = torch.zeros_like(hid)
    mask[:, shared] = 1
    for t in range(mask.shape[0]):
        for e in top[t].tolist():
            mask[t, groups[e]] = 1
    want = dense.net[2](hid * mask)
    assert torch.allclose(got[2].reshape(-1, 16), want, atol=1e-5)


# ----------------------------------------------------------------------------- Mixture of Blocks


class _Block(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, hidden_states, temb):
        return hidden_states + torch.tanh(self.lin(hidden_states) + temb[:, None, :])


class _Net(nn.Module):
    def __init__(self, n=4, d=8):
        super().__init__()
        self.transformer_blocks = nn.ModuleList(_Block(d) for _ in range(n))

    def forward(self, x, temb):
        for b in self.transformer_blocks:
            x = b(hidden_states=x, temb=temb)
        return x


def test_routed_blocks_run_only_their_samples_and_match_a_per_sample_reference():
    from compress.modules import mob

    torch.manual_seed(0)
    net = _Net()
    dense = copy.deepcopy(net)
    names = [f"transformer_blocks.{i}" for i in range(4)]
    tmpl = {"inputs": ["kw:hidden_states"], "tuple": False}
    groups = mob.install(net, [names[:2], names[2:]], 1, dict.fromkeys(names, tmpl), 8, False,
                         None)
    with torch.no_grad():
        for g in groups:
            g.router.weight.normal_(0, 3)
    x, temb = torch.randn(6, 5, 8), torch.randn(6, 8)
    calls = []
    for n in names:
        net.get_submodule(n).lin.register_forward_hook(
            lambda _m, a, _o, n=n: calls.append((n, a[0].shape[0])))
    got = net(x, temb)
    ref = []
    for s in range(6):
        h = x[s:s + 1]
        for g, pair in zip(groups, (names[:2], names[2:])):
            score = g.router(h.mean(1))
            j = int(score.argmax())
            h = dense.get_submodule(pair[j])(hidden_states=h, temb=temb[s:s + 1])
        ref.append(h)
    assert torch.allclose(got, torch.cat(ref), atol=1e-6)
    assert sum(b for _, b in calls) == 2 * 6  # each sample ran one block of each pair
    got.pow(2).sum().backward()
    assert all(g.router.weight.grad.abs().sum() > 0 for g in groups)
    # distill's route_noise: 0 trains on the routers' own choice, noise tries other blocks
    mob.explore(net, 0.0)
    assert torch.allclose(net(x, temb), got, atol=1e-6)
    mob.explore(net, 50.0)
    torch.manual_seed(1)
    assert not torch.allclose(net(x, temb), got, atol=1e-3)
    mob.explore(net, 0.0)
    # keeping every block of a group is the dense model exactly
    full = copy.deepcopy(dense)
    mob.install(full, [names[:2], names[2:]], 2, dict.fromkeys(names, tmpl), 8, False, None)
    assert torch.equal(full(x, temb), dense(x, temb))


@pytest.mark.parametrize("family", FAMILIES)
def test_moe_then_routed_blocks_then_distill_reload_with_the_run_images(
        family, tiny_pipeline_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("DIT_COMPRESS_CACHE", str(tmp_path / "cache"))
    src = str(tiny_pipeline_dir(family))
    rec = _recipe({"route_blocks": {"group": 2, "keep": 1}},
                  {"distill": {"steps": 2, "batch": 2, "checkpoint_every": 0,
                               "data": {"num_prompts": 2, "seeds_per_prompt": 1}}},
                  experts=4, top_k=1)
    rep = compress.run_recipe(rec, src, tmp_path / "o")
    ev = rep["eval"]
    from compress.models import load_model

    ours = compress.load_pipeline(tmp_path / "o")
    gen = load_model(src).adapter.generate
    got = gen(ours, ev["prompts"], ev["seeds"], ev["steps"], ev["guidance"], ev["resolution"])
    assert np.array_equal(got, rep["_student_images"])
    fr = rep["blocks_load"]["run_fraction"]
    # one block of each pair runs per sample
    pairs = [k for k in fr if k.endswith((".0", ".2", ".4"))]
    assert all(fr[k] + fr[k[:-1] + str(int(k[-1]) + 1)] == pytest.approx(1.0) for k in pairs)
    assert rep["size"]["params_active"] < 0.7 * rep["size"]["params_total"]
    feats = rep["passes"][2]["feature_pairs"]
    assert all(s.endswith((".1", ".3", ".5")) for s in feats)  # group ends only


def test_structural_passes_after_route_blocks_are_refused(tmp_path):
    from compress.recipe import validate

    for later in ({"prune_depth": {"method": "influence", "ratio": 0.25}},
                  {"to_moe": {"experts": 2}}):
        with pytest.raises(UserError, match="after 'route_blocks'"):
            validate({"name": "x", "passes": [{"route_blocks": {"group": 2, "keep": 1}},
                                              later]})


def test_distill_with_lora_trains_the_routers_in_full(tiny_pipeline_dir, tmp_path, monkeypatch):
    """LoRA wraps the experts' Linears; the routers stay plain Linears that learn, so the
    routing the Route object computes is the trained router's."""
    monkeypatch.setenv("DIT_COMPRESS_CACHE", str(tmp_path / "cache"))
    src = str(tiny_pipeline_dir("pixart"))
    rec = _recipe({"distill": {"steps": 3, "batch": 2, "lr": 0.05, "checkpoint_every": 0,
                               "lora": {"rank": 2, "alpha": 2},
                               "data": {"num_prompts": 2, "seeds_per_prompt": 1}}},
                  experts=4, top_k=1)
    rep = compress.run_recipe(rec, src, tmp_path / "o")
    ours = compress.load_pipeline(tmp_path / "o").transformer
    pair = next(m for m in ours.modules() if isinstance(m, moe.MoEIn))
    assert isinstance(pair.router, nn.Linear) and pair.route.router is pair.router
    assert rep["passes"][1]["lora_merged"] > 0
    compress.run_recipe(_recipe(experts=4, top_k=1), src, tmp_path / "untrained")
    start = compress.load_pipeline(tmp_path / "untrained").transformer
    first = next(m for m in start.modules() if isinstance(m, moe.MoEIn))
    assert not torch.equal(first.router.weight, pair.router.weight)  # the router learned


def _pixart_with_identity_block(tmp_path, monkeypatch):
    """A tiny PixArt saved to disk whose block 1 is an identity (its output layers zeroed)."""
    from tiny_pipelines import build_tiny_pipeline

    monkeypatch.setenv("DIT_COMPRESS_CACHE", str(tmp_path / "cache"))
    pipe = build_tiny_pipeline("pixart", seed=0)
    blk = pipe.transformer.transformer_blocks[1]
    with torch.no_grad():
        for lin in (blk.attn1.to_out[0], blk.attn2.to_out[0], blk.ff.net[2]):
            lin.weight.zero_()
            lin.bias.zero_()
    src = tmp_path / "src"
    pipe.save_pretrained(src)
    return src


def test_per_sample_start_finds_the_block_that_changes_nothing(tmp_path, monkeypatch):
    """route_blocks start: per_sample measures, per calibration sample, what skipping each
    block alone does to the output and fits the routers to it: a block made an identity (its
    output layers zeroed) is the one every sample skips, and the fitted router says so."""
    src = _pixart_with_identity_block(tmp_path, monkeypatch)
    rec = {"name": "r", **TINY, "eval": {**TINY["eval"], "enabled": False},
           "passes": [{"route_blocks": {"group": 2, "keep": 1, "start": "per_sample",
                                        "calib_samples": 4}}]}
    rep = compress.run_recipe(rec, str(src), None)
    fit = rep["passes"][0]["per_sample_fit"]
    first = fit["transformer_blocks.0,transformer_blocks.1"]
    assert first["rows"] > 0 and first["best_skip_share"] == [0.0, 1.0]
    assert first["fit_agrees"] == 1.0 and first["static_agrees"] == 1.0
    assert all(sum(v["best_skip_share"]) == pytest.approx(1.0) for v in fit.values())


def test_learnable_start_drops_the_block_that_changes_nothing(tmp_path, monkeypatch):
    """route_blocks start: learnable trains TinyFusion's choice on the route's own groups and
    starts each router on the kept blocks: a block made an identity is the one dropped, and
    its router's bias ranks it last."""
    src = _pixart_with_identity_block(tmp_path, monkeypatch)
    rec = {"name": "r", **TINY, "eval": {**TINY["eval"], "enabled": False},
           "passes": [{"route_blocks": {"group": 2, "keep": 1, "start": "learnable",
                                        "start_strength": 2.0, "calib_samples": 4,
                                        "learnable": {"steps": 30, "batch": 2, "lora_rank": 0,
                                                      "lr": 0.5}}}]}
    rep = compress.run_recipe(rec, str(src), tmp_path / "o")
    pas = rep["passes"][0]
    first = "transformer_blocks.0,transformer_blocks.1"
    assert pas["starting_choice"][first] == ["transformer_blocks.0"]
    grp = next(g for g in pas["learnable"]["groups"] if g["blocks"][0] == "transformer_blocks.0")
    assert grp["remove"] == ["transformer_blocks.1"] and grp["probability"] > 0.6
    router = compress.load_pipeline(tmp_path / "o").transformer.block_routers[0]
    assert float(router.bias[0]) > float(router.bias[1]) + 2.0


def test_learnable_group_size_must_match_the_route(tmp_path):
    from compress.recipe import validate

    with pytest.raises(UserError, match="learnable.group_size 3 differs from group 2"):
        validate({"name": "x", "passes": [{"route_blocks": {
            "group": 2, "keep": 1, "start": "learnable", "learnable": {"group_size": 3}}}]})


def test_learnable_start_on_own_module(tmp_path):
    """start: learnable on a plain-PyTorch DiT (blocks in an nn.Sequential of its own names):
    the choice trains there too and the routed module reloads onto a fresh instance."""
    work = _shapedit()
    x = (torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3)),
         torch.tensor([7, 800]), torch.tensor([5, 432]))
    rec = {"name": "r", **TINY, "eval": {**TINY["eval"], "enabled": False},
           "passes": [{"route_blocks": {"group": 2, "keep": 1, "start": "learnable",
                                        "calib_samples": 4,
                                        "learnable": {"steps": 3, "batch": 2}}}]}
    rep = compress.run_recipe(rec, model=work, calibrate_fn=_calibrate, out=tmp_path / "o",
                              inplace=True)
    groups = rep["passes"][0]["learnable"]["groups"]
    assert len(groups) == len(rep["passes"][0]["starting_choice"]) > 0
    assert all(len(g["remove"]) == 1 for g in groups)
    fresh = compress.load_module(tmp_path / "o", _shapedit())
    with torch.no_grad():
        assert torch.equal(fresh(*x), work(*x))
