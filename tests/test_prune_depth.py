"""prune_depth: every family's pruned output loads with stock diffusers and gives the run's
images; each method picks the blocks it should; a user's module is pruned and restored."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from tiny_pipelines import FAMILIES

import compress
from compress.errors import UserError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
TINY = {"calibration": {"num_prompts": 2, "steps": 3},
        "eval": {"num_prompts": 2, "steps": 3, "latency": False}}


def _recipe(**prune) -> dict:
    return {"name": "d", **TINY, "passes": [{"prune_depth": prune}]}


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_output_loads_with_stock_diffusers(family, tiny_pipeline_dir, tmp_path,
                                                  monkeypatch):
    from diffusers import DiffusionPipeline

    from compress.io.load import own_memory_
    from compress.models import load_model

    monkeypatch.setenv("DIT_COMPRESS_CACHE", str(tmp_path / "cache"))
    src = tiny_pipeline_dir(family)
    handle = load_model(str(src))
    before = {n.rpartition(".")[0] for n, _ in handle.adapter.blocks(handle.transformer)}
    counts = {c: len(getattr(handle.transformer, c)) for c in before}
    rep = compress.run_recipe(_recipe(method="influence", remove=1), str(src), tmp_path / "o")
    assert len(rep["passes"][0]["removed"]) == len(counts)  # one per block list (Flux: two)
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "o")  # stock diffusers, no help
    own_memory_(pipe)
    for c, n in counts.items():
        assert len(getattr(pipe.transformer, c)) == n - 1
    ev = rep["eval"]
    args = (ev["prompts"], ev["seeds"], ev["steps"], ev["guidance"], ev["resolution"])
    assert np.array_equal(handle.adapter.generate(pipe, *args), rep["_student_images"])
    ours = compress.load_pipeline(tmp_path / "o")
    assert np.array_equal(handle.adapter.generate(ours, *args), rep["_student_images"])
    assert rep["size"]["params_total"] < rep["model"]["params"]


def _shapedit(depth: int = 4):
    from compress.demo.shapedit import ShapeDiT

    torch.manual_seed(0)
    return ShapeDiT(width=64, depth=depth, heads=2).eval()


def _calibrate(mod):
    from compress.demo.shapedit import sample_seeds

    sample_seeds(mod, [11, 12], steps=4)


def _identity(m, *cells):
    """Zero the cells' residual branches: each returns its input unchanged."""
    with torch.no_grad():
        for c in cells:
            for lin in (m.core.cells[c].lin_b, m.core.cells[c].lin_d):
                lin.weight.zero_()
                lin.bias.zero_()


@pytest.mark.parametrize("method,identity,expect", [
    ("influence", (1,), ["core.cells.1"]),
    ("skip_error", (1,), ["core.cells.1"]),
    # an interval is kept as its first block: with cells 1 and 2 doing nothing, the interval
    # 1..2 is exactly linear (the identity) and collapses to cell 1
    ("intervals", (1, 2), ["core.cells.2"]),
    ("learnable", (1,), ["core.cells.1"]),
])
def test_methods_find_blocks_that_do_nothing(method, identity, expect):
    m = _shapedit()
    _identity(m, *identity)
    extra = {"learnable": {"steps": 80, "batch": 2, "lr": 0.2, "lora_rank": 4,
                           "checkpoint_every": 0}} if method == "learnable" else {}
    rep = compress.run_recipe(_recipe(method=method, remove=1, **extra), m,
                              calibrate_fn=_calibrate, out=None)
    assert rep["passes"][0]["removed"] == expect, rep["passes"][0]
    if method == "learnable":
        assert rep["passes"][0]["learnable"]["groups"][0]["probability"] > 0.5


def test_random_last_and_list(tiny_pipeline_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("DIT_COMPRESS_CACHE", str(tmp_path / "cache"))
    src = str(tiny_pipeline_dir("flux"))
    rep = compress.run_recipe(_recipe(method="last", remove=1), src, None)
    from compress.models import load_model

    tr = load_model(src).transformer
    n2, n1 = len(tr.single_transformer_blocks), len(tr.transformer_blocks)
    assert rep["passes"][0]["removed"] == [f"transformer_blocks.{n1 - 1}",
                                           f"single_transformer_blocks.{n2 - 1}"]
    r1 = compress.run_recipe(_recipe(method="random", remove=1, seed=3), src, None)
    r2 = compress.run_recipe(_recipe(method="random", remove=1, seed=3), src, None)
    assert r1["passes"][0]["removed"] == r2["passes"][0]["removed"]
    rep = compress.run_recipe(_recipe(method="list", blocks=["transformer_blocks.0"]), src, None)
    assert rep["passes"][0]["removed"] == ["transformer_blocks.0"]


def test_bad_configs_are_refused_before_any_work(tiny_pipeline_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("DIT_COMPRESS_CACHE", str(tmp_path / "cache"))
    src = str(tiny_pipeline_dir("sd3"))
    for bad, msg in [({"method": "list"}, "blocks"),
                     ({"method": "influence"}, "exactly one of ratio"),
                     ({"method": "influence", "ratio": 0.5, "remove": 1}, "exactly one"),
                     ({"method": "last", "blocks": ["transformer_blocks.0"]}, "method list")]:
        with pytest.raises(UserError, match=msg):
            compress.run_recipe(_recipe(**bad), src, tmp_path / "o")
    from compress.models import load_model

    n = len(load_model(src).transformer.transformer_blocks)
    with pytest.raises(UserError, match="last"):  # SD3's last block has other shapes
        compress.run_recipe(_recipe(method="list", blocks=[f"transformer_blocks.{n - 1}"]),
                            src, tmp_path / "o")
    with pytest.raises(UserError, match="transformer_blocks.99"):
        compress.run_recipe(_recipe(method="list", blocks=["transformer_blocks.99"]), src,
                            tmp_path / "o")
    assert not (tmp_path / "o").exists() and not (tmp_path / "cache").exists()


def test_own_module_pruned_and_restored(tmp_path):
    m = _shapedit()
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(2, 3, 32, 32, generator=g), torch.tensor([7, 800]), torch.tensor([5, 432]))
    work = copy.deepcopy(m)
    rep = compress.run_recipe(_recipe(method="skip_error", remove=2), model=work,
                              calibrate_fn=_calibrate, out=tmp_path / "o", inplace=True)
    assert len(rep["passes"][0]["removed"]) == 2
    torch.manual_seed(99)
    fresh = compress.load_module(tmp_path / "o", _shapedit())
    with torch.no_grad():
        assert torch.equal(fresh(*x), work(*x))
    assert sum(p.numel() for p in fresh.parameters()) < sum(p.numel() for p in m.parameters())
