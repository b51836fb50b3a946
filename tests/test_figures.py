"""Reported figures against direct measurements: per-layer output error of smoothed W8A8
layers, bits per weight and bytes against the stored files, group sizes on narrow layers, run
times."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import compress
from compress.demo.shapedit import ShapeDiT, sample_seeds
from compress.quant.qtensor import sqnr_db

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def _model(width: int = 64) -> ShapeDiT:
    torch.manual_seed(0)
    m = ShapeDiT(width=width, depth=2, heads=2).eval()
    m.register_buffer("table", torch.randn(4096))  # a persistent buffer, stored with the weights
    return m


def _calibrate(m):
    sample_seeds(m, [11, 12], steps=4)


def test_w8a8_layer_errors_match_the_layers_real_output_error(tmp_path):
    m = _model()
    orig = copy.deepcopy(m)
    rep = compress.run_recipe(RECIPES / "w8a8.yaml", model=m, calibrate_fn=_calibrate,
                              out=None, inplace=True)
    rows = {r["layer"]: r for r in rep["passes"][0]["layers"]}
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in rows}
    hooks = [m.get_submodule(n).register_forward_pre_hook(
        lambda _m, a, n=n: seen[n].append(a[0].detach())) for n in rows]
    _calibrate(m)
    for h in hooks:
        h.remove()
    smoothed = 0
    for n, r in rows.items():
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in seen[n]])
        with torch.no_grad():
            direct = sqnr_db(orig.get_submodule(n)(x), m.get_submodule(n)(x))
        smoothed += r.get("kind") == "w8a8"
        assert abs(r["output_sqnr_db"] - direct) < 3.0, (n, r["output_sqnr_db"], direct)
    assert smoothed == len(rows)


def test_bits_bytes_and_times_match_what_is_stored(tmp_path):
    m = _model()
    rep = compress.run_recipe(RECIPES / "w8.yaml", model=m, calibrate_fn=_calibrate,
                              out=tmp_path / "o")
    stored = 0
    with safe_open(str(tmp_path / "o" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        for k in f.keys():  # noqa: SIM118 - safe_open is not a mapping
            t = f.get_tensor(k)
            stored += t.numel() * t.element_size()
    size = rep["size"]
    assert size["bytes"] == stored
    elems = sum(p.numel() for p in m.parameters()) + m.table.numel()
    assert rep["model"]["params"] + rep["model"]["buffer_elements"] == elems
    assert size["bits_per_weight"] == pytest.approx(stored * 8 / elems)
    assert size["bits_per_weight"] < 32  # fp32 source: never more than it
    t = rep["timing"]
    assert t["total_seconds"] >= t["passes_seconds"] >= rep["passes"][0]["seconds"] > 0


def test_group_size_reported_is_the_one_used_on_narrow_layers():
    m = _model(width=32)
    rep = compress.run_recipe(RECIPES / "w4-g64.yaml", model=m, calibrate_fn=_calibrate)
    rows = {r["layer"]: r for r in rep["passes"][0]["layers"]}
    assert rows["core.cells.0.lin_a"]["group_size"] == 32  # 32 inputs: one group of 32
    assert rows["core.cells.0.lin_d"]["group_size"] == 64  # 128 inputs: two groups of 64
