"""A user's video-like DiT whose blocks sit in stages (a ModuleDict of nn.Sequential) and whose
sampler returns latents: blocks found inside the stages, quality in latent PSNR checked against
a direct measurement, mixed precision judged by the user's sampler, coverage checked by forward
hooks on the quantised modules while the sampler runs, reload bit-equal, and a peer tool on the
same module."""

from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import compress
from compress.models.generic import analyse_module

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
ROOT = Path(__file__).resolve().parents[1]
CH, FRAMES, SIDE, DC = 4, 2, 4, 24  # DC < the low-rank recipe's rank 32: a narrow layer


class Unit(nn.Module):
    """Fused qkv self-attention (SDPA), cross-attention to a text sequence through one fused
    key/value Linear, a GEGLU feed-forward split by chunk, adaLN from a 6-way `mod` Linear."""

    def __init__(self, d: int, heads: int = 2) -> None:
        super().__init__()
        self.h = heads
        self.mod = nn.Linear(d, 6 * d)
        self.n1, self.n2, self.n3 = (nn.LayerNorm(d, elementwise_affine=False) for _ in range(3))
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ask, self.kv, self.tell = nn.Linear(d, d), nn.Linear(DC, 2 * d), nn.Linear(d, d)
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(2 * d, d)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(t.shape[0], t.shape[1], self.h, -1).transpose(1, 2)

    def forward(self, x, c, txt):
        s1, b1, g1, s2, b2, g2 = self.mod(F.silu(c)).unsqueeze(1).chunk(6, -1)
        q, k, v = self._heads(self.qkv(self.n1(x) * (1 + s1) + b1)).chunk(3, -1)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        x = x + g1 * self.proj(y)
        k, v = self._heads(self.kv(txt)).chunk(2, -1)
        y = F.scaled_dot_product_attention(self._heads(self.ask(self.n2(x))), k, v)
        x = x + self.tell(y.transpose(1, 2).flatten(2))
        a, gate = self.up(self.n3(x) * (1 + s2) + b2).chunk(2, -1)
        return x + g2 * self.down(a * F.gelu(gate))


class StageNet(nn.Module):
    def __init__(self, d: int = 64) -> None:
        super().__init__()
        self.inp = nn.Linear(CH, d)
        self.clock = nn.Sequential(nn.Linear(16, d), nn.SiLU(), nn.Linear(d, d))
        self.words = nn.Linear(DC, DC)
        self.stages = nn.ModuleDict({"early": nn.Sequential(Unit(d), Unit(d)),
                                     "late": nn.Sequential(Unit(d))})
        self.out = nn.Linear(d, CH)

    def forward(self, lat, t, text):
        b = lat.shape[0]
        x = self.inp(lat.flatten(2).transpose(1, 2))  # (B, T*H*W, C) tokens
        f = torch.exp(-math.log(1e4) * torch.arange(8) / 8)
        a = t.float()[:, None] * f
        c = self.clock(torch.cat([a.sin(), a.cos()], -1))
        txt = self.words(text)
        for stage in self.stages.values():  # the stages are iterated, never called
            for unit in stage:
                x = unit(x, c, txt)
        return self.out(x).transpose(1, 2).reshape(b, CH, FRAMES, SIDE, SIDE)


def _net(seed: int = 0, d: int = 64) -> StageNet:
    torch.manual_seed(seed)
    return StageNet(d).eval()


def _text(seed: int) -> torch.Tensor:
    return torch.randn(1, 5, DC, generator=torch.Generator().manual_seed(seed + 7))


@torch.no_grad()
def sampler(model: nn.Module, seeds, steps: int = 3) -> torch.Tensor:
    """Epsilon-prediction DDIM on latents (N, 4, T, H, W): no image anywhere."""
    outs = []
    ab = torch.cos(torch.linspace(0.05, 1.0, steps + 1) * math.pi / 2) ** 2
    for s in seeds:
        x = torch.randn(1, CH, FRAMES, SIDE, SIDE, generator=torch.Generator().manual_seed(int(s)))
        for i in range(steps):
            a_t, a_n = ab[i + 1].clamp_min(1e-3), ab[i]
            eps = model(x, torch.tensor([999 - 300 * i]), _text(int(s)))
            x = a_n.sqrt() * (x - (1 - a_t).sqrt() * eps) / a_t.sqrt() + (1 - a_n).sqrt() * eps
        outs.append(x)
    return torch.cat(outs)


def _calibrate(m: nn.Module) -> None:
    sampler(m, [50, 51])


def _inputs():
    g = torch.Generator().manual_seed(2)
    return (torch.randn(2, CH, FRAMES, SIDE, SIDE, generator=g), torch.tensor([10, 700]),
            torch.randn(2, 5, DC, generator=g))


def test_blocks_inside_stages_and_roles():
    st = analyse_module(_net(), _inputs())
    assert st.blocks == ["stages.early.0", "stages.early.1", "stages.late.0"]
    want = {"inp": "embed", "clock.0": "embed", "clock.2": "embed", "words": "embed",
            "out": "proj_out"}
    for b in st.blocks:
        want.update({f"{b}.mod": "adaln", f"{b}.qkv": "attn_qkv", f"{b}.proj": "attn_out",
                     f"{b}.ask": "cross_attn", f"{b}.kv": "cross_attn", f"{b}.tell": "cross_attn",
                     f"{b}.up": "ff_in", f"{b}.down": "ff_out"})
    assert st.roles == want


def test_latent_quality_is_psnr_of_the_latents(tmp_path):
    from compress.metrics.own import latent_psnr

    m = _net()
    recipe = {"name": "w8", "passes": [{"ptq": {}}], "eval": {"num_prompts": 3, "latency": False},
              "gates": {"psnr_vs_teacher": ">= 20"}}
    rep = compress.run_recipe(recipe, model=m, calibrate_fn=_calibrate, sample_fn=sampler,
                              out=tmp_path / "o")
    q = rep["quality"]
    assert q["samples"] == "latents" and q["ssim_vs_teacher"] is None
    seeds = rep["eval"]["seeds"]
    teacher = sampler(m, seeds).numpy()
    student = sampler(compress.load_module(tmp_path / "o", _net(9)), seeds).numpy()
    direct = latent_psnr(teacher, student)
    assert q["psnr_vs_teacher"] == pytest.approx(direct, abs=1e-4)
    # a broken student must not score: PSNR against a shuffled set is far lower
    assert latent_psnr(teacher, student[::-1]) < direct - 10
    assert rep["gates"]["psnr_vs_teacher"]["passed"] is True
    assert "(latents)" in (tmp_path / "o" / "report.md").read_text()
    assert not list((tmp_path / "o").rglob("*.png"))  # latents are not pictures


def test_mixed_precision_image_metric_needs_a_sampler(tmp_path):
    ptq = {"weights": {"bits": 4}, "mixed_precision": {"candidates": [4, 8], "avg_bits": 6,
                                                       "image_prompts": 2}}
    recipe = {"name": "mp", "passes": [{"ptq": ptq}], "eval": {"num_prompts": 2, "latency": False}}
    with_s = compress.run_recipe(recipe, model=_net(), calibrate_fn=_calibrate, sample_fn=sampler)
    mp = with_s["passes"][0]["mixed_precision"]
    assert mp["metrics"] == ["output", "image"] and "image_metric" not in mp
    assert all(r["img_err@4"] > r["img_err@8"] >= 0 for r in mp["table"])
    assert mp["avg_bits"] <= 6
    without = compress.run_recipe(recipe, model=_net(), calibrate_fn=_calibrate)
    mp = without["passes"][0]["mixed_precision"]
    assert mp["metrics"] == ["output"] and mp["image_metric"].startswith("not measured")
    assert not any("img_err@4" in r for r in mp["table"])
    assert mp["budget_met"] is True and mp["avg_bits"] <= 6


def test_unreachable_budget_takes_the_cheapest_and_says_so():
    """16 channels wide, the 4-channel embedder: per-row scales alone exceed w4a8-mp's 4.5
    bits; the shipped recipe still runs, at the cheapest allocation, and the report says so."""
    rep = compress.run_recipe(ROOT / "recipes" / "w4a8-mp.yaml", model=_net(d=16),
                              calibrate_fn=_calibrate, sample_fn=sampler,
                              overrides=["eval.num_prompts=2", "eval.latency=false"])
    mp = rep["passes"][0]["mixed_precision"]
    assert mp["budget_met"] is False and mp["cheapest_avg_bits"] > mp["budget_avg_bits"] == 4.5
    assert mp["avg_bits"] == pytest.approx(mp["cheapest_avg_bits"], abs=2e-3)
    assert {r["bits"] for r in mp["table"]} == {4}
    with pytest.raises(compress.errors.UserError, match="cheapest allocation.*if_unreachable"):
        compress.run_recipe(ROOT / "recipes" / "w4a8-mp.yaml", model=_net(d=16),
                            calibrate_fn=_calibrate, overrides=[
                                "passes.0.ptq.mixed_precision.if_unreachable=refuse"])


def _quantised(m: nn.Module) -> bool:
    return type(m).__module__.startswith("compress.modules.") and hasattr(m, "in_features")


@pytest.mark.parametrize("recipe", ["w4a4-lowrank", "w4a8-mp", "w8a8"])
def test_coverage_equals_what_runs_quantised_and_reload_is_bit_equal(recipe, tmp_path):
    m = _net()
    total = sum(p.numel() for p in m.parameters())
    work = copy.deepcopy(m)
    rep = compress.run_recipe(ROOT / "recipes" / f"{recipe}.yaml", model=work,
                              calibrate_fn=_calibrate, sample_fn=sampler, out=tmp_path / "o",
                              inplace=True, overrides=["eval.num_prompts=2", "eval.latency=false"])
    p = rep["passes"][0]
    ran: dict[str, int] = {}
    hooks = [mod.register_forward_hook(
        lambda mod, i, o, n=n: ran.__setitem__(n, mod.in_features * mod.out_features))
        for n, mod in work.named_modules() if _quantised(mod)]
    sampler(work, [3])
    for h in hooks:
        h.remove()
    assert len(ran) == p["layers_quantized"] >= 21  # the 7 non-adaLN Linears of 3 blocks
    assert p["weights_quantized_fraction"] == pytest.approx(sum(ran.values()) / total, rel=1e-9)
    assert p["weights_quantized_and_used_fraction"] == pytest.approx(sum(ran.values()) / total)
    if recipe == "w4a8-mp":  # the user's sampler judged the layers
        assert "image" in p["mixed_precision"]["metrics"]
        assert p["mixed_precision"]["avg_bits"] <= 4.5
    if recipe == "w4a4-lowrank":  # narrow layers keep the rank they can hold
        kv = work.get_submodule("stages.early.0.kv")
        assert kv.rank == DC
    fresh = compress.load_module(tmp_path / "o", _net(7))
    x = _inputs()
    with torch.no_grad():
        assert torch.equal(fresh(*x), work(*x))
    assert torch.equal(sampler(fresh, [4]), sampler(work, [4]))
    assert rep["quality"]["psnr_vs_teacher"] > 20


def test_peer_on_own_module(tmp_path, monkeypatch):
    """A peer tool through the same sampler: its PSNR is the latent PSNR of the module it
    quantised, measured directly; a peer library that breaks on the model fails clearly."""
    import dataclasses

    sys.path.insert(0, str(ROOT / "eval"))
    import peer_schemes
    import peers

    from compress.metrics.own import latent_psnr

    m = _net()
    work = copy.deepcopy(m)  # run_peer quantises the module it is given
    out = peers.run_peer("bnb-int8", work, tmp_path / "p", 2, calibrate_fn=_calibrate,
                         sample_fn=sampler)
    rep = json.loads((out / "report.json").read_text())
    q = rep["quality"]
    assert q["samples"] == "latents" and rep["eval"]["seeds"] == [1000, 1001]
    direct = latent_psnr(sampler(m, [1000, 1001]).numpy(), sampler(work, [1000, 1001]).numpy())
    assert q["psnr_vs_teacher"] == pytest.approx(direct, abs=1e-4) and direct > 20
    assert rep["passes"][0]["layers_quantized"] >= 21

    def broken(handle, layers, calib):
        raise RuntimeError("kernel exploded\nsecond line")

    spec = dataclasses.replace(peer_schemes.PEER_SPECS["bnb-int8"], apply=broken)
    monkeypatch.setitem(peer_schemes.PEER_SPECS, "bnb-int8", spec)
    with pytest.raises(peers.PeerFailed, match=r"bnb-int8 failed while quantising.*exploded \(the"):
        peers.run_peer("bnb-int8", copy.deepcopy(m), tmp_path / "q", 2,
                       calibrate_fn=_calibrate, sample_fn=sampler)
    assert not (tmp_path / "q" / "report.json").exists()
