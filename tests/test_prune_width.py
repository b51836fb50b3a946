"""prune_width: every family's pruned output reloads with the run's images and reports the
parameters it saved; each method finds heads and channels that do nothing; the trajectory the
learnable gates train on is the pipeline's own, with the same gradient checkpointed or not; a
user's module is pruned and restored; bad configs are refused before any work."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from tiny_pipelines import FAMILIES, first_call_inputs, run_first_call

import compress
from compress.errors import UserError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
TINY = {"calibration": {"num_prompts": 2, "steps": 3},
        "eval": {"num_prompts": 2, "steps": 3, "latency": False}}
FAST_GATES = {"steps": 3, "checkpoint_every": 0, "data": {"num_prompts": 2}}


def _recipe(*more, **prune) -> dict:
    return {"name": "w", **TINY, "passes": [{"prune_width": prune}, *more]}


def _saved_params(out, buffers: set[str]) -> int:
    """Numbers stored in the output's transformer files, its buffers (position tables) aside."""
    from safetensors import safe_open

    total = 0
    for f in (out / "transformer").glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            total += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys()  # noqa: SIM118
                         if k not in buffers)
    return total


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_output_reloads_with_the_run_images(family, tiny_pipeline_dir, tmp_path,
                                                   monkeypatch):
    monkeypatch.setenv("DIT_COMPRESS_CACHE", str(tmp_path / "cache"))
    src = str(tiny_pipeline_dir(family))
    # DiT's blocks are mostly adaLN tables: its heads and channels hold 16% of them
    rep = compress.run_recipe(_recipe(method="activation", sparsity=0.1 if family == "dit"
                                      else 0.25), src, tmp_path / "o")
    p = rep["passes"][0]
    assert p["block_sparsity"] == pytest.approx(0.1 if family == "dit" else 0.25, abs=0.06)
    assert p["params_after"] < p["params_before"]
    ev = rep["eval"]
    args = (ev["prompts"], ev["seeds"], ev["steps"], ev["guidance"], ev["resolution"])
    from compress.models import load_model

    handle = load_model(src)
    ours = compress.load_pipeline(tmp_path / "o")
    buffers = {n for n, _ in ours.transformer.named_buffers()}
    assert rep["size"]["params_total"] == p["params_after"] == _saved_params(tmp_path / "o",
                                                                             buffers)
    assert np.array_equal(handle.adapter.generate(ours, *args), rep["_student_images"])
    assert p["stock_loadable"] is False  # heads set the model width in every family


def test_sana_channels_reload_with_stock_diffusers(tiny_pipeline_dir, tmp_path, monkeypatch):
    from diffusers import DiffusionPipeline

    from compress.io.load import own_memory_

    monkeypatch.setenv("DIT_COMPRESS_CACHE", str(tmp_path / "cache"))
    src = str(tiny_pipeline_dir("sana"))
    rep = compress.run_recipe(_recipe(method="taylor", channel_ratio=0.25, channel_multiple=4),
                              src, tmp_path / "o")
    assert rep["passes"][0]["stock_loadable"] is True
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "o")  # stock diffusers, no help
    own_memory_(pipe)
    ev = rep["eval"]
    from compress.models import load_model

    gen = load_model(src).adapter.generate
    got = gen(pipe, ev["prompts"], ev["seeds"], ev["steps"], ev["guidance"], ev["resolution"])
    assert np.array_equal(got, rep["_student_images"])


def test_gates_at_zero_compute_what_removal_computes():
    """The gates every method scores through are exact stand-ins for removal."""
    from tiny_pipelines import build_tiny_pipeline

    from compress.models import adapter_for
    from compress.models.width import remove, units
    from compress.prune.width_gates import Gates

    tr = build_tiny_pipeline("flux").transformer.eval()
    ad = adapter_for(tr)
    found = units(tr, ad)
    keep = {u.name: [i for i in range(u.count) if i % 2 == 0] for u in found}
    gates = Gates(tr, found)
    gates.gate = {u.name: torch.tensor([1.0 if i % 2 == 0 else 0.0 for i in range(u.count)])
                  for u in found}
    with torch.no_grad():
        want = run_first_call(tr, "flux")
    gates.remove()
    with torch.no_grad():
        full = run_first_call(tr, "flux")
    remove(tr, ad, keep)
    with torch.no_grad():
        got = run_first_call(tr, "flux")
    assert (got - want).abs().max() < 1e-5 * want.abs().max()
    assert (full - want).abs().max() > 1e-3 * want.abs().max()  # the gates did something
    assert first_call_inputs("flux")  # the inputs stayed what they were


def _shapedit(depth: int = 2):
    from compress.demo.shapedit import ShapeDiT

    torch.manual_seed(0)
    return ShapeDiT(width=64, depth=depth, heads=2).eval()


def _calibrate(mod):
    from compress.demo.shapedit import sample_seeds

    sample_seeds(mod, [11, 12], steps=4)


def _dead(m):
    """Head 1 (v rows) and channels 0..63 (input rows) of every cell output zeros; the cells'
    residual gates are opened (a fresh ShapeDiT's are near zero) so the live ones matter."""
    with torch.no_grad():
        for cell in m.core.cells:
            cell.mod[1].bias[64:128] = 1  # g1
            cell.mod[1].bias[256:320] = 1  # g2
            cell.lin_a.weight[128 + 32:] = 0
            cell.lin_a.bias[128 + 32:] = 0
            cell.lin_c.weight[:64] = 0
            cell.lin_c.bias[:64] = 0


@pytest.mark.parametrize("method", ["activation", "taylor", "learnable"])
def test_methods_find_heads_and_channels_that_do_nothing(method):
    m = _shapedit()
    _dead(m)
    extra = {"learnable": {"objective": "calls", "steps": 60, "batch": 2,
                           "checkpoint_every": 0}} if method == "learnable" else {}
    rep = compress.run_recipe(_recipe(method=method, head_ratio=0.5, channel_ratio=0.25,
                                      **extra), m, calibrate_fn=_calibrate, out=None, inplace=True)
    p = rep["passes"][0]
    assert p["kept"] == {"attn (heads, of 2)": [1, 1], "ff (channels, of 256)": [192, 192]}
    for cell in m.core.cells:  # the kept head is head 0, the kept channels are 64..255
        assert cell.lin_a.weight.shape[0] == 96 and cell.lin_c.weight.shape[0] == 192
        assert cell.lin_a.weight[64:].abs().sum() > 0  # v rows of the live head
        assert cell.lin_c.weight.abs().sum(1).min() > 0
    if method == "learnable":
        assert p["learnable"]["objective"] == "calls"  # a module has no sampler to unroll


def test_trajectory_is_the_pipelines_and_checkpointing_keeps_its_gradient(tiny_pipeline_dir):
    from compress.models import load_model
    from compress.models.width import units
    from compress.prune.trajectory import final_latent
    from compress.prune.width_gates import Gates

    h = load_model(str(tiny_pipeline_dir("pixart")))
    h.run = {}
    args = (4, None, None)
    with torch.no_grad():
        lat = final_latent(h, "a red cube", 5, *args)
        direct = h.pipeline(prompt=["a red cube"], generator=[torch.Generator().manual_seed(5)],
                            num_inference_steps=4, output_type="latent",
                            use_resolution_binning=False, clean_caption=False,
                            max_sequence_length=120).images
    assert torch.allclose(lat, direct, atol=1e-6)
    found = units(h.transformer, h.adapter)
    gates = Gates(h.transformer, found)
    grads = []
    for ckpt in (False, True):
        g = {u.name: torch.ones(u.count, requires_grad=True) for u in found}
        gates.gate = g
        final_latent(h, "a red cube", 5, *args, checkpoint=ckpt).pow(2).sum().backward()
        grads.append(torch.cat([g[u.name].grad for u in found]))
    gates.remove()
    assert grads[0].abs().max() > 0
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6 * grads[0].abs().max())


def test_learnable_trajectory_then_distill_then_ptq_in_one_recipe(tiny_pipeline_dir, tmp_path,
                                                                  monkeypatch):
    monkeypatch.setenv("DIT_COMPRESS_CACHE", str(tmp_path / "cache"))
    src = str(tiny_pipeline_dir("sd3"))
    rec = _recipe({"distill": {"steps": 3, "batch": 2, "checkpoint_every": 0,
                               "data": {"num_prompts": 2, "seeds_per_prompt": 1}}},
                  {"ptq": {"weights": {"bits": 8}, "activations": {"bits": 8}}},
                  method="learnable", sparsity=0.25, learnable=FAST_GATES)
    rep = compress.run_recipe(rec, src, tmp_path / "o")
    p = rep["passes"][0]
    assert p["learnable"]["objective"] == "trajectory" and p["learnable"]["steps"] == 3
    assert p["block_sparsity"] == pytest.approx(0.25, abs=0.06)
    ev = rep["eval"]
    from compress.models import load_model

    gen = load_model(src).adapter.generate
    ours = compress.load_pipeline(tmp_path / "o")
    got = gen(ours, ev["prompts"], ev["seeds"], ev["steps"], ev["guidance"], ev["resolution"])
    assert np.array_equal(got, rep["_student_images"])


def test_own_module_pruned_and_restored(tmp_path):
    m = _shapedit()
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(2, 3, 32, 32, generator=g), torch.tensor([7, 800]), torch.tensor([5, 432]))
    work = copy.deepcopy(m)
    rep = compress.run_recipe(_recipe(method="taylor", sparsity=0.3, uniform=False), model=work,
                              calibrate_fn=_calibrate, out=tmp_path / "o", inplace=True)
    assert rep["passes"][0]["block_sparsity"] == pytest.approx(0.3, abs=0.05)
    torch.manual_seed(99)
    fresh = compress.load_module(tmp_path / "o", _shapedit())
    with torch.no_grad():
        assert torch.equal(fresh(*x), work(*x))
    assert sum(p.numel() for p in fresh.parameters()) < sum(p.numel() for p in m.parameters())


def test_bad_configs_are_refused_before_any_work(tiny_pipeline_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("DIT_COMPRESS_CACHE", str(tmp_path / "cache"))
    src = str(tiny_pipeline_dir("pixart"))
    for bad, msg in [({"method": "taylor"}, "give sparsity"),
                     ({"sparsity": 0.2, "head_ratio": 0.5}, "not both"),
                     ({"head_ratio": 0.0}, "nothing to remove"),
                     ({"sparsity": 0.95}, "lower sparsity"),
                     ({"sparsity": 0.2, "heads": {"x": 0}}, "positive")]:
        with pytest.raises(UserError, match=msg):
            compress.run_recipe(_recipe(**bad), src, tmp_path / "o")
    assert not (tmp_path / "o").exists() and not (tmp_path / "cache").exists()


def test_module_without_head_counts_is_told_which_key_gives_them(tmp_path):
    """Manual attention under names no rule knows and no head attribute: refused with the
    recipe key that supplies the count; with it, pruned and reloaded onto a fresh instance."""
    from test_own_dit import ListNet, _list_inputs

    torch.manual_seed(0)
    net = ListNet().eval()

    def cal(m):
        with torch.no_grad():
            for _ in range(3):
                m(*_list_inputs())

    with pytest.raises(UserError, match=r"prune_width\.heads"):
        compress.run_recipe(_recipe(method="taylor", sparsity=0.2), copy.deepcopy(net),
                            calibrate_fn=cal, out=None)
    work = copy.deepcopy(net)
    rep = compress.run_recipe(_recipe(method="taylor", sparsity=0.2, uniform=False,
                                      heads={r"re:stages\.\d+": 2}),
                              work, calibrate_fn=cal, out=tmp_path / "o", inplace=True)
    assert rep["passes"][0]["block_sparsity"] == pytest.approx(0.2, abs=0.03)
    torch.manual_seed(5)
    fresh = compress.load_module(tmp_path / "o", ListNet().eval())
    x = _list_inputs()
    with torch.no_grad():
        assert torch.equal(fresh(*x), work(*x))
