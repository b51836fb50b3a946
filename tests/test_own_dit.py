"""A user's own DiT in plain PyTorch: structure found from one traced call, every shipped recipe
runs on it as shipped, the output reloads bit-equal onto a fresh instance, gates that cannot be
measured are refused before any work."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import compress
from compress.demo.shapedit import ShapeDiT, sample_seeds
from compress.errors import UserError
from compress.models.generic import analyse_module

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def _tiny_shapedit(seed: int = 0, depth: int = 2) -> ShapeDiT:
    torch.manual_seed(seed)
    return ShapeDiT(width=64, depth=depth, heads=2).eval()


def _calibrate(m):
    sample_seeds(m, [11, 12], steps=4)


def _inputs():
    g = torch.Generator().manual_seed(3)
    return torch.randn(2, 3, 32, 32, generator=g), torch.tensor([7, 800]), torch.tensor([5, 432])


# ---------------------------------------------------------------------- structure and roles


def test_shapedit_blocks_and_roles_from_the_trace():
    m = _tiny_shapedit()
    st = analyse_module(m, _inputs())
    assert st.traced and st.blocks == ["core.cells.0", "core.cells.1"]
    want = {"tokenize": "embed", "clock.0": "embed", "clock.2": "embed", "tail.mod.1": "adaln",
            "tail.out": "proj_out"}
    for i in range(2):
        p = f"core.cells.{i}."
        want.update({p + "mod.1": "adaln", p + "lin_a": "attn_qkv", p + "lin_b": "attn_out",
                     p + "lin_c": "ff_in", p + "lin_d": "ff_out"})
    assert st.roles == want
    assert all(st.reasons[n] for n in want)


class Mixer(nn.Module):
    """Manual softmax attention with separate q/k/v, cross-attention to a shorter context,
    a SwiGLU feed-forward and FiLM modulation, under names no rule knows."""

    def __init__(self, d: int, dc: int) -> None:
        super().__init__()
        self.film = nn.Linear(d, 4 * d)
        self.n1, self.n2, self.n3 = (nn.LayerNorm(d, elementwise_affine=False) for _ in range(3))
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(d, d) for _ in range(4))
        self.xq, self.xo = nn.Linear(d, d), nn.Linear(d, d)
        self.xk, self.xv = nn.Linear(dc, d), nn.Linear(dc, d)
        self.g, self.u, self.dn = nn.Linear(d, 2 * d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, h, ctx, c):
        a, b, e, f = self.film(c).unsqueeze(1).chunk(4, -1)
        z = self.n1(h) * (1 + a) + b
        q, k, v = self.wq(z), self.wk(z), self.wv(z)
        w = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)
        h = h + self.wo(w @ v)
        z = self.n2(h)
        att = torch.softmax(self.xq(z) @ self.xk(ctx).transpose(-1, -2), dim=-1)
        h = h + self.xo(att @ self.xv(ctx))
        z = self.n3(h) * (1 + e) + f
        return h + self.dn(F.silu(self.g(z)) * self.u(z))


class ListNet(nn.Module):
    """Blocks in a plain Python list under an attribute of its own name."""

    def __init__(self, d: int = 32, dc: int = 24, n: int = 3) -> None:
        super().__init__()
        self.inp = nn.Linear(12, d)
        self.cond = nn.Sequential(nn.Linear(1, d), nn.SiLU(), nn.Linear(d, d))
        self.txt = nn.Linear(dc, dc)
        self.stages = [Mixer(d, dc) for _ in range(n)]
        self.head = nn.Linear(d, 12)

    def forward(self, x, t, ctx):
        h, c, ctx = self.inp(x), self.cond(t[:, None]), self.txt(ctx)
        for s in self.stages:
            h = s(h, ctx, c)
        return self.head(h)


def _list_inputs(n: int = 2):
    g = torch.Generator().manual_seed(5)
    return (torch.randn(n, 10, 12, generator=g), torch.rand(n, generator=g),
            torch.randn(n, 4, 24, generator=g))


def test_plain_list_blocks_manual_attention_cross_and_swiglu():
    torch.manual_seed(0)
    net = ListNet().eval()
    compress.models.generic.ADAPTER.prepare(net)  # the list becomes a ModuleList
    assert isinstance(net.stages, nn.ModuleList) and "stages.0.wq.weight" in net.state_dict()
    st = analyse_module(net, _list_inputs())
    assert st.blocks == ["stages.0", "stages.1", "stages.2"]
    want = {"inp": "embed", "cond.0": "embed", "cond.2": "embed", "txt": "embed",
            "head": "proj_out"}
    for i in range(3):
        p = f"stages.{i}."
        want.update({p + "film": "adaln", p + "wq": "attn_qkv", p + "wk": "attn_qkv",
                     p + "wv": "attn_qkv", p + "wo": "attn_out", p + "xq": "cross_attn",
                     p + "xk": "cross_attn", p + "xv": "cross_attn", p + "xo": "cross_attn",
                     p + "g": "ff_in", p + "u": "ff_in", p + "dn": "ff_out"})
    assert st.roles == want


def test_model_spec_overrides_blocks_and_roles():
    m = _tiny_shapedit()
    spec = compress.ModelSpec(blocks=["core.cells.1"], roles={"re:.*lin_c": "other",
                                                              "core.cells.0.lin_c": "ff_out"})
    st = analyse_module(m, _inputs(), spec=spec)
    assert st.blocks == ["core.cells.1"]
    assert st.roles["core.cells.0.lin_c"] == "ff_out"  # exact beats regex
    assert st.roles["core.cells.1.lin_c"] == "other"
    with pytest.raises(ValueError, match="not a role"):
        compress.ModelSpec(roles={"x": "attention"})


def test_inspect_module_prints_reasons_and_folds_only_full_rows():
    text = compress.inspect(_tiny_shapedit(), _inputs())
    assert "core.cells x2" in text and "takes the output of a softmax self-attention" in text
    assert "core.cells.*.lin_b" in text
    from compress.models.inspect import format_inspect

    d = {"source": None, "family": "generic", "class": "X", "dtype": "float32", "params": 10,
         "block_lists": {"b": 3}, "blocks": [], "params_per_role": {},
         "layers": [{"name": f"b.{i}.ff", "type": "Linear", "role": "ff_in", "shape": [4, 4]}
                    for i in range(3)]
         + [{"name": "b.0.extra", "type": "Linear", "role": "other", "shape": [4, 4]},
            {"name": "b.1.extra", "type": "Linear", "role": "other", "shape": [8, 4]}]}
    out = format_inspect(d)
    assert "b.*.ff" in out and "b.[0].extra" in out and "b.[1].extra" in out
    assert "b.*.extra" not in out


# ------------------------------------------------------------------ every recipe as shipped


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_every_shipped_recipe_runs_on_own_module_and_reloads(recipe, tmp_path):
    names = [next(iter(p)) for p in compress.load_recipe(recipe).resolved()["passes"]]
    pruned = "prune_depth" in names or "route_blocks" in names  # blocks removed or skipped
    depth = 4 if pruned else 2  # a quarter of 2 blocks is none; a group of 3 needs 3
    m = _tiny_shapedit(depth=depth)
    x = _inputs()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        ref = m(*x)
    work = copy.deepcopy(m)
    fast = [f"passes.{i}.distill.steps=4" for i, n in enumerate(names) if n == "distill"] + [
        f"passes.{i}.prune_width.learnable.steps=4" for i, n in enumerate(names)
        if n == "prune_width"] + [
        f"passes.{i}.prune_depth.learnable.steps=4" for i, n in enumerate(names)
        if n == "prune_depth"]
    report = compress.run_recipe(recipe, model=work, calibrate_fn=_calibrate, out=tmp_path / "o",
                                 inplace=True, overrides=fast)
    # 4 attention/feed-forward Linears in each of 2 blocks (2 or 3 of 4 after depth pruning),
    # over one or more format passes
    quantized = sum(p.get("layers_quantized", 0) for p in report["passes"])
    assert quantized >= 8 or not ({"ptq", "vq"} & set(names))
    for p in report["passes"]:
        if "weights_quantized_fraction" in p:
            assert p["weights_quantized_and_used_fraction"] == pytest.approx(
                p["weights_quantized_fraction"])
    assert all(g["passed"] in (None, True) for g in report["gates"].values())
    fresh = compress.load_module(tmp_path / "o", _tiny_shapedit(seed=99, depth=depth))
    with torch.no_grad():
        got, again = fresh(*x), work(*x)
    assert torch.equal(got, again)
    from compress.quant.qtensor import sqnr_db

    assert sqnr_db(ref, got) > (0 if pruned else 15)  # a random 4-block model missing blocks drifts
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def _short(name: str) -> dict:
    """A shipped recipe with its distillation cut to a few steps (what these tests check does
    not depend on training length)."""
    import yaml

    r = yaml.safe_load((RECIPES[0].parent / name).read_text())
    for p in r["passes"]:
        if "distill" in p:
            p["distill"].update(steps=4, warmup=1)
    return r


def test_module_is_left_unchanged_by_default(tmp_path):
    m = _tiny_shapedit()
    first = m.core.cells[0].lin_a
    compress.run_recipe(_short("width-30-kd.yaml"), model=m, calibrate_fn=_calibrate,
                        out=tmp_path / "o")
    assert m.core.cells[0].lin_a is first and type(first) is nn.Linear


# ------------------------------------------------------------------------- gates and errors


def test_unmeasurable_gate_is_refused_before_any_work(tmp_path):
    calls = []
    recipe = {"name": "g", "passes": [{"ptq": {}}], "gates": {"prompt_accuracy_drop": "<= 0.01"}}
    with pytest.raises(UserError, match="prompt_accuracy_drop.*cannot be measured"):
        compress.run_recipe(recipe, model=_tiny_shapedit(), calibrate_fn=calls.append,
                            out=tmp_path / "o")
    assert not calls and not (tmp_path / "o").exists()
    with pytest.raises(UserError, match="no such figure"):
        compress.recipe.validate({"name": "g", "passes": [{"ptq": {}}], "gates": {"psnr": ">= 3"}})


def test_load_errors_name_what_to_do(tmp_path):
    compress.run_recipe(_short("width-30-kd.yaml"), model=_tiny_shapedit(), calibrate_fn=_calibrate,
                        out=tmp_path / "o")
    with pytest.raises(UserError, match="load_module"):
        compress.load_transformer(tmp_path / "o")
    with pytest.raises(UserError, match="ShapeDiT"):
        compress.load_module(tmp_path / "o", nn.Linear(2, 2))
    with pytest.raises(UserError, match="config"):
        compress.load_module(tmp_path / "o", ShapeDiT(width=64, depth=1, heads=2))


def test_own_sampler_and_metric_give_quality_and_gates(tmp_path):
    """PSNR and the user's metric for teacher and student, checked against sampling the
    original and the reloaded module directly on the same seeds."""
    from compress.metrics.image import psnr

    m = _tiny_shapedit()
    scores = []

    def sampler(mod, seeds):
        return sample_seeds(mod, seeds, steps=3)

    def metric(images, conds):
        scores.append(float(images.mean()))
        return scores[-1]

    recipe = {"name": "w8", "passes": [{"ptq": {}}],
              "eval": {"num_prompts": 3, "latency": False},
              "gates": {"psnr_vs_teacher": ">= 20", "prompt_accuracy_drop": "<= 1"}}
    rep = compress.run_recipe(recipe, model=m, calibrate_fn=_calibrate, sample_fn=sampler,
                              metric_fn=metric, out=tmp_path / "o")
    q = rep["quality"]
    seeds = rep["eval"]["seeds"]
    assert seeds == [1000, 1001, 1002] and len(rep["eval"]["prompts"]) == 3
    teacher = sampler(m, seeds)[0].permute(0, 2, 3, 1).numpy()
    student = sampler(compress.load_module(tmp_path / "o", _tiny_shapedit(5)), seeds)[0]
    student = student.permute(0, 2, 3, 1).numpy()
    from compress.metrics.evaluate import to_8bit_grid

    assert q["psnr_vs_teacher"] == pytest.approx(psnr(to_8bit_grid(teacher), to_8bit_grid(student)))
    assert q["teacher_prompt_accuracy"] == pytest.approx(float(teacher.mean()), abs=1e-6)
    assert q["prompt_accuracy"] == pytest.approx(float(student.mean()), abs=1e-6)
    assert all(g["passed"] is not None for g in rep["gates"].values())
    assert (tmp_path / "o" / "report.html").is_file()


# where the trace reads the data flow differently from the hand-written family rules, and why
_KNOWN_DIFFERENCES = {
    # the timestep embedding also shifts/scales the final norm (scale_shift_table + emb)
    "adaln_single.emb.timestep_embedder.linear_2": ("embed", "adaln"),
    "time_embed.emb.timestep_embedder.linear_2": ("embed", "adaln"),
    # Flux's single blocks project [attention, MLP] together: the trace names attention first
    "single_transformer_blocks.0.proj_out": ("ff_out", "attn_out"),
    "single_transformer_blocks.1.proj_out": ("ff_out", "attn_out"),
}


@pytest.mark.parametrize("family", ["dit", "pixart", "sd3", "flux", "sana"])
def test_inference_on_diffusers_models_matches_the_family_rules(family):
    """Treated as unknown modules, the diffusers transformers get the blocks and roles their
    hand-written adapters give them (except where noted): the inference is not tuned to one
    model."""
    from tiny_pipelines import build_tiny_pipeline

    from compress.models import adapter_for

    pipe = build_tiny_pipeline(family)
    tr = pipe.transformer
    adapter = adapter_for(tr)
    seen = {}
    h = tr.register_forward_pre_hook(lambda _m, a, k: seen.setdefault("x", (a, dict(k))),
                                     with_kwargs=True)
    try:
        adapter.generate(pipe, ["a red circle"], [0], 2, None, None)
    finally:
        h.remove()
    args, kwargs = seen["x"]
    st = analyse_module(tr, args, {**kwargs, "return_dict": False})
    assert st.blocks == [b for b, _ in adapter.blocks(tr)]
    for name, _, role in adapter.weight_layers(tr):
        assert (role, st.roles[name]) == _KNOWN_DIFFERENCES.get(name, (role, role)), (
            name, st.reasons[name])


def test_model_spec_selectors_checked_like_the_others():
    # blank or uncompilable block selectors are refused when the recipe is read, as roles' are
    for blocks in (["re:("], [""], ["  "]):
        with pytest.raises(UserError, match="model.blocks"):
            compress.recipe.validate({"name": "s", "passes": [{"ptq": {}}],
                                      "model": {"blocks": blocks}})
    with pytest.raises(UserError, match="model.roles"):
        compress.recipe.validate({"name": "s", "passes": [{"ptq": {}}],
                                  "model": {"roles": {"": "ff_in"}}})
    # an exact layer name in roles that the model lacks is refused, not silently ignored
    with pytest.raises(UserError, match="core.cells.0.lin_q"):
        analyse_module(_tiny_shapedit(), _inputs(),
                       spec=compress.ModelSpec(roles={"core.cells.0.lin_q": "ff_in"}))
