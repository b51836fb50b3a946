"""export-quanto: ptq outputs rewritten in optimum-quanto's format and read back by quanto's own
``requantize``; the codes and scales must carry over exactly, and what quanto cannot hold must
be refused with one line."""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from compress.cli import main
from compress.errors import UserError

quanto = pytest.importorskip("optimum.quanto")


@pytest.fixture(autouse=True)
def _eager_kernels():
    """Eager int4 unpacking: these tests compare codes, not speed, and many layer shapes would
    run the compiled kernel into torch's recompile limit."""
    from compress.quant import kernels

    saved = kernels._fusion["enabled"]
    kernels.set_fusion(False)
    yield
    kernels.set_fusion(saved)


TINY_RUN = {"calibration": {"num_prompts": 1, "steps": 2},
            "eval": {"enabled": False, "latency": False}}


def _run(src: Path, out: Path, ptq: dict) -> Path:
    import compress

    recipe = {"name": "t", **TINY_RUN, "passes": [{"ptq": {"calib_samples": 2, **ptq}}]}
    compress.run_recipe(recipe, model=str(src), out=out)
    return out


def _requantize(dest: Path) -> nn.Module:
    """What a quanto user does: empty model from config.json, then requantize."""
    import diffusers
    from accelerate import init_empty_weights
    from safetensors.torch import load_file

    config = json.loads((dest / "config.json").read_text())
    with init_empty_weights():
        model = getattr(diffusers, config["_class_name"]).from_config(config)
    sd = load_file(str(dest / "diffusion_pytorch_model.safetensors"))
    quanto.requantize(model, sd, json.loads((dest / "quanto_qmap.json").read_text()))
    return model.eval()


def _pixart_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    kw = {"encoder_hidden_states": torch.randn(2, 7, 32, generator=g),
          "timestep": torch.tensor([700, 700]),
          "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}, "return_dict": False}
    return x, kw


def _ours_and_theirs(out: Path, dest: Path):
    from compress.io.load import load_transformer

    ours, theirs = load_transformer(out / "transformer"), _requantize(dest)
    x, kw = _pixart_inputs()
    with torch.no_grad():
        return ours, theirs, ours(x, **kw)[0], theirs(x, **kw)[0]


def _same_weights(ours: nn.Module, theirs: nn.Module) -> int:
    """Every quantised layer of ours (a QConv2d counts once, not its inner matrix) has the same
    dequantised weight and bias in quanto's model; returns how many were compared."""
    n, seen = 0, []
    for name, m in ours.named_modules():
        if hasattr(m, "dequantized_weight") and not any(name.startswith(p + ".") for p in seen):
            seen.append(name)
            qm = theirs.get_submodule(name)
            assert isinstance(qm.weight, quanto.QTensor), name
            assert torch.equal(m.dequantized_weight(), qm.weight.dequantize()), name
            assert (m.bias is None and qm.bias is None) or torch.equal(m.bias.float(), qm.bias)
            n += 1
    return n


@pytest.mark.parametrize("ptq, qtypes", [
    ({"weights": {"bits": 8}}, {"qint8"}),
    # mixed per layer: asymmetric int4, int8 and symmetric int2 all map exactly
    ({"weights": {"bits": 4, "symmetric": False},
      "overrides": {"ff_out": {"bits": 8, "symmetric": True}, "attn_qkv": {"bits": 2}}},
     {"qint4", "qint8", "qint2"}),
])
def test_weight_only_export_reloads_exactly(ptq, qtypes, tiny_pipeline_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("DIT_COMPRESS_CACHE", str(tmp_path / "cache"))
    from compress.io.quanto_export import export_quanto, load_quanto

    out = _run(tiny_pipeline_dir("pixart"), tmp_path / "out", ptq)
    dest = export_quanto(out, tmp_path / "q")
    assert sorted(p.name for p in dest.iterdir()) == [
        "config.json", "diffusion_pytorch_model.safetensors", "quanto_qmap.json"]
    qmap = json.loads((dest / "quanto_qmap.json").read_text())
    assert {v["weights"] for v in qmap.values()} == qtypes
    assert {v["activations"] for v in qmap.values()} == {"none"}
    ours, theirs, a, b = _ours_and_theirs(out, dest)
    manifest = json.loads((out / "transformer" / "compress_manifest.json").read_text())
    assert _same_weights(ours, theirs) == len(manifest["passes"][0]["meta"]["layers"]) == len(qmap)
    # same dequantised weights: only the matmul's summation order may differ
    assert (a - b).abs().max() <= 1e-5 * a.abs().max()
    # quanto's own diffusers wrapper, and our helper, read the same layout
    wrapped = quanto.QuantizedPixArtTransformer2DModel.from_pretrained(str(dest))
    x, kw = _pixart_inputs()
    with torch.no_grad():
        assert torch.equal(wrapped(x, **kw)[0], b)
        assert torch.equal(load_quanto(dest)(x, **kw)[0], b)


def test_static_w8a8_cli_export(tiny_pipeline_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DIT_COMPRESS_CACHE", str(tmp_path / "cache"))
    from compress.modules.w8a8 import W8A8Linear
    from compress.quant.qtensor import sqnr_db

    out = _run(tiny_pipeline_dir("pixart"), tmp_path / "out",
               {"weights": {"bits": 8}, "activations": {"bits": 8, "mode": "static"}})
    dest = tmp_path / "q"
    dest.mkdir()
    (dest / "x").write_text("keep")
    capsys.readouterr()
    assert main(["export-quanto", str(out), str(dest)]) == 2  # non-empty DEST
    err = capsys.readouterr().err.strip()
    assert "--force" in err and "\n" not in err and (dest / "x").is_file()
    assert main(["export-quanto", str(out), str(dest), "--force"]) == 0
    assert not (dest / "x").exists()
    qmap = json.loads((dest / "quanto_qmap.json").read_text())
    assert {(v["weights"], v["activations"]) for v in qmap.values()} == {("qint8", "qint8")}

    ours, theirs, a, b = _ours_and_theirs(out, dest)
    assert _same_weights(ours, theirs) == len(qmap)
    for name, m in ours.named_modules():
        if isinstance(m, W8A8Linear):
            qm = theirs.get_submodule(name)
            assert qm.input_scale.item() == m.act_scale.item()
            assert 0 < qm.output_scale.item() < 1  # measured, not quanto's default of 1
    # quanto rounds each such layer's output to int8 as well (ours keeps it in float) ...
    assert sqnr_db(a, b) > 35
    # ... and without that extra rounding it computes what ours does
    for m in theirs.modules():
        if isinstance(m, quanto.QModuleMixin):
            m.disable_output_quantization()
    x, kw = _pixart_inputs()
    with torch.no_grad():
        assert sqnr_db(a, theirs(x, **kw)[0]) > 60


def test_unrepresentable_output_refused_by_cli(tiny_pipeline_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DIT_COMPRESS_CACHE", str(tmp_path / "cache"))
    out = _run(tiny_pipeline_dir("pixart"), tmp_path / "out", {"weights": {"bits": 3}})
    dest = tmp_path / "q"
    capsys.readouterr()
    assert main(["export-quanto", str(out), str(dest)]) == 2
    err = capsys.readouterr().err.strip()
    assert "int3" in err and "\n" not in err
    assert not dest.exists() and not list(tmp_path.glob(".q.tmp-*"))
    assert main(["export-quanto", str(tmp_path / "missing"), str(dest)]) == 2


# --- in memory, on a plain module: int4 group mapping and every refusal ------------------------


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(97, 256)   # quanto: one int4 scale per row (97 <= 128 inputs)
        self.b = nn.Linear(256, 40)   # quanto: int4 groups of 128

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def _ptq_toy(weights: dict) -> tuple[Toy, Toy]:
    from compress.models.base import ModelHandle
    from compress.models.generic import ADAPTER
    from compress.passes.ptq import Config, apply

    torch.manual_seed(0)
    m, fresh = Toy(), Toy()
    apply(ModelHandle(transformer=m, adapter=ADAPTER), None,
          Config.model_validate({"weights": weights, "include": ["a", "b"]}))
    return m, fresh


@pytest.mark.parametrize("weights", [
    {"bits": 4, "granularity": "group", "group_size": 128},
    {"bits": 4, "granularity": "group", "group_size": 256, "symmetric": False},
    {"bits": 4},
])
def test_int4_groups_map_onto_quanto_groups(weights, tmp_path):
    from safetensors.torch import load_file

    from compress.io.quanto_export import save_quanto, to_quanto

    ours, fresh = _ptq_toy(weights)
    x = torch.randn(8, 97)
    with torch.no_grad():
        ref = ours(x)
    w_ours = {n: getattr(ours, n).dequantized_weight() for n in ("a", "b")}
    save_quanto(to_quanto(ours), tmp_path / "q")
    qmap = json.loads((tmp_path / "q" / "quanto_qmap.json").read_text())
    quanto.requantize(fresh, load_file(str(tmp_path / "q" / "diffusion_pytorch_model.safetensors")),
                      qmap)
    assert fresh.b.weight_group_size == 128 and fresh.a.weight_group_size is None
    for n in ("a", "b"):
        assert torch.equal(getattr(fresh, n).weight.dequantize(), w_ours[n])
    with torch.no_grad():
        assert torch.allclose(fresh(x), ref, rtol=0, atol=1e-5 * ref.abs().max().item())


def _lin(i=256, o=40):
    torch.manual_seed(0)
    return nn.Linear(i, o)


def _refused_cases():
    from compress.modules.int4 import Int4Linear
    from compress.modules.lowrank_linear import LowRankQLinear
    from compress.modules.qconv import QConv2d
    from compress.modules.qlinear import QLinear
    from compress.modules.w8a8 import W8A8Linear

    return {
        "int6": (lambda: QLinear.from_linear(_lin(), 6), "int6"),
        "asym int8": (lambda: QLinear.from_linear(_lin(), 8, symmetric=False), "symmetric"),
        "grouped int8": (lambda: QLinear.from_linear(_lin(), 8, 64), "channel"),
        "int4 g64 vs 128": (lambda: QLinear.from_linear(_lin(), 4, 64), "group_size: 128"),
        "Int4Linear g64 vs 128": (lambda: Int4Linear.from_linear(_lin(), 64), "group_size: 128"),
        "int4 groups, quanto rows": (lambda: QLinear.from_linear(_lin(96), 4, 32), "channel"),
        "dynamic w8a8": (lambda: W8A8Linear.from_linear(_lin(), "dynamic"), "static"),
        "timestep groups": (lambda: W8A8Linear.from_linear(_lin(), "static", [0.1, 0.2]),
                            "timestep_groups"),
        "smoothing": (lambda: W8A8Linear.from_linear(_lin(), "static", 0.1,
                                                     smooth=torch.full((256,), 2.0)), "smoothing"),
        "low rank": (lambda: LowRankQLinear(256, 40, True, 4, 4, 64, 4, False), "low-rank"),
        "fp8 grouped scales": (_fp8_grouped, "one per output channel"),
        # a conv is refused by the rules of its weight matrix [out, in/groups*kh*kw], named
        "conv int4 g32 vs 128": (lambda: QConv2d.from_conv(_conv(), 4, 32), "group_size: 128"),
        "conv int3": (lambda: QConv2d.from_conv(_conv(), 3), "int3"),
        "conv grouped int8": (lambda: QConv2d.from_conv(_conv(), 8, 128), "channel"),
    }


def _conv(c_in=16, c_out=8, k=4, **kw):
    torch.manual_seed(0)
    return nn.Conv2d(c_in, c_out, k, **kw)  # fan-in 256: quanto's int4 groups are 128


def _fp8_grouped():
    """An FP8Linear with two scales per row (ptq never writes one): not quanto's layout."""
    from compress.modules.fp8_linear import FP8Linear

    m = FP8Linear.from_linear(_lin())
    m.scale = torch.stack([m.scale, m.scale], 1)
    return m


@pytest.mark.parametrize("case", list(_refused_cases()))
def test_unrepresentable_layers_refused(case):
    from compress.io.quanto_export import to_quanto

    make, needle = _refused_cases()[case]
    root = nn.Sequential(nn.Linear(256, 256), make())
    layer = root[1]
    with pytest.raises(UserError) as e:
        to_quanto(root)
    msg = str(e.value)
    assert "1:" in msg and needle in msg and "\n" not in msg
    assert root[1] is layer  # nothing was swapped


def test_static_needs_calibration_and_measures_output_range():
    from compress.io.quanto_export import to_quanto
    from compress.modules.w8a8 import W8A8Linear

    root = nn.Sequential(W8A8Linear.from_linear(_lin(), "static", 0.05))
    with pytest.raises(UserError, match="calibrate_fn"):
        to_quanto(root)
    x = torch.randn(16, 256)
    with torch.no_grad():
        amax = root(x).abs().max().item()
    to_quanto(root, calibrate_fn=lambda m: m(x))
    assert isinstance(root[0], quanto.QLinear) and root[0].activation_qtype == quanto.qint8
    assert root[0].input_scale.item() == pytest.approx(0.05)
    assert root[0].output_scale.item() == pytest.approx(amax / 127)


def test_fp8_weights_map_to_qfloat8(tmp_path):
    fp8 = pytest.importorskip("compress.modules.fp8_linear")
    from safetensors.torch import load_file

    from compress.io.quanto_export import save_quanto, to_quanto

    torch.manual_seed(0)
    root, fresh = nn.Sequential(fp8.FP8Linear.from_linear(_lin())), nn.Sequential(_lin())
    w = root[0].dequantized_weight()
    save_quanto(to_quanto(root), tmp_path / "q")
    qmap = json.loads((tmp_path / "q" / "quanto_qmap.json").read_text())
    assert qmap == {"0": {"weights": "qfloat8_e4m3fn", "activations": "none"}}
    quanto.requantize(fresh, load_file(str(tmp_path / "q" / "diffusion_pytorch_model.safetensors")),
                      qmap)
    assert torch.equal(fresh[0].weight.dequantize(), w)


# --- the int4 recipes (Int4Linear) on widths that suit quanto's groups -------------------------


REPO = Path(__file__).resolve().parents[1]
FAST = ["calibration.num_prompts=1", "calibration.steps=2", "passes.0.ptq.calib_samples=2",
        "eval.enabled=false", "eval.latency=false"]


@pytest.fixture(scope="module")
def wide_pixart_dir(tmp_path_factory) -> Path:
    """The tiny PixArt pipeline with a 256-wide transformer: every block Linear has 256 or 1024
    inputs, so quanto groups int4 weights by 128 on all of them (the tiny one is 32 wide, where
    quanto keeps one scale per row)."""
    from diffusers import PixArtSigmaPipeline, PixArtTransformer2DModel
    from tiny_pipelines import TINY_RESOLUTION, build_tiny_pipeline

    pipe = build_tiny_pipeline("pixart", seed=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tr = PixArtTransformer2DModel(
            num_attention_heads=4, attention_head_dim=64, in_channels=4, out_channels=8,
            num_layers=2, norm_num_groups=4, cross_attention_dim=256,
            sample_size=TINY_RESOLUTION // 2, patch_size=2, caption_channels=32,
            use_additional_conditions=False)
    pipe = PixArtSigmaPipeline(**{**pipe.components, "transformer": tr.eval()})
    out = tmp_path_factory.mktemp("wide_pixart")
    pipe.save_pretrained(out)
    return out


@pytest.mark.parametrize("recipe", ["w4-g64", "w4-gptq"])
def test_int4_recipes_export_where_quanto_groups_fit(recipe, wide_pixart_dir, tmp_path,
                                                     monkeypatch):
    import compress
    from compress.io.quanto_export import export_quanto
    from compress.modules.int4 import Int4Linear

    monkeypatch.setenv("DIT_COMPRESS_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    compress.run_recipe(REPO / "recipes" / f"{recipe}.yaml", model=str(wide_pixart_dir), out=out,
                        overrides=[*FAST, "passes.0.ptq.weights.group_size=128"])
    layers = json.loads((out / "transformer" / "compress_manifest.json").read_text()
                        )["passes"][0]["meta"]["layers"]
    assert {r["kind"] for r in layers.values()} == {"int4"}  # ptq wrote Int4Linear everywhere
    dest = export_quanto(out, tmp_path / "q")
    qmap = json.loads((dest / "quanto_qmap.json").read_text())
    assert {(v["weights"], v["activations"]) for v in qmap.values()} == {("qint4", "none")}
    ours, theirs, a, b = _ours_and_theirs(out, dest)
    int4 = {n for n, m in ours.named_modules() if isinstance(m, Int4Linear)}
    assert int4 == set(qmap) and len(int4) == len(layers) >= 12
    # quanto's own groups of 128 (ours are 128 too), not one scale per row
    assert {theirs.get_submodule(n).weight_group_size for n in int4} == {128}
    assert _same_weights(ours, theirs) == len(int4)
    assert (a - b).abs().max() <= 1e-5 * a.abs().max()


def test_int4_g64_recipe_refused_on_quanto_groups_of_128(wide_pixart_dir, tmp_path, monkeypatch,
                                                         capsys):
    import compress

    monkeypatch.setenv("DIT_COMPRESS_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    compress.run_recipe(REPO / "recipes" / "w4-g64.yaml", model=str(wide_pixart_dir), out=out,
                        overrides=FAST)
    capsys.readouterr()
    assert main(["export-quanto", str(out), str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err.strip()
    assert "transformer_blocks." in err and "group_size: 128" in err and "\n" not in err
    assert not (tmp_path / "q").exists()


# --- fp8 Linear layers and quantised convolutions -----------------------------------------------


@pytest.mark.parametrize("conv, qtypes", [
    ({}, {"qfloat8_e4m3fn"}),  # the patch-embedding conv in fp8 too
    ({"format": "int", "bits": 4}, {"qfloat8_e4m3fn", "qint4"}),  # conv around an Int4Linear
])
def test_fp8_and_conv_pipeline_export_reloads_exactly(conv, qtypes, tiny_pipeline_dir, tmp_path,
                                                      monkeypatch):
    from compress.io.quanto_export import export_quanto
    from compress.modules.fp8_linear import FP8Linear
    from compress.modules.qconv import QConv2d

    monkeypatch.setenv("DIT_COMPRESS_CACHE", str(tmp_path / "cache"))
    out = _run(tiny_pipeline_dir("pixart"), tmp_path / "out", {
        "weights": {"format": "fp8_e4m3"},
        "include": ["attn_qkv", "attn_out", "cross_attn", "ff_in", "ff_out", "pos_embed.proj"],
        "overrides": {"pos_embed.proj": conv} if conv else {}})
    dest = export_quanto(out, tmp_path / "q")
    qmap = json.loads((dest / "quanto_qmap.json").read_text())
    assert {v["weights"] for v in qmap.values()} == qtypes
    ours, theirs, a, b = _ours_and_theirs(out, dest)
    fp8 = [n for n, m in ours.named_modules() if isinstance(m, FP8Linear)]
    assert len(fp8) >= 12 and all(qmap[n]["weights"] == "qfloat8_e4m3fn" for n in fp8
                                  if not n.startswith("pos_embed."))
    ours_conv, their_conv = ours.get_submodule("pos_embed.proj"), theirs.pos_embed.proj
    assert isinstance(ours_conv, QConv2d) and isinstance(their_conv, quanto.QConv2d)
    assert type(ours_conv.wq).__name__ == ("Int4Linear" if conv else "FP8Linear")
    assert (their_conv.kernel_size, their_conv.stride) == (ours_conv.kernel_size, ours_conv.stride)
    assert _same_weights(ours, theirs) == len(qmap)
    assert (a - b).abs().max() <= 1e-5 * a.abs().max()
    wrapped = quanto.QuantizedPixArtTransformer2DModel.from_pretrained(str(dest))
    x, kw = _pixart_inputs()
    with torch.no_grad():
        assert torch.equal(wrapped(x, **kw)[0], b)


class Convs(nn.Module):
    """Fan-ins 256, 288 and 54: quanto's int4 groups are 128, 96 and one per row."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(16, 32, 4, stride=2, padding=1)
        self.b = nn.Conv2d(32, 24, 3, padding=1, padding_mode="reflect", bias=False)
        self.c = nn.Conv2d(24, 8, 3, padding="same", groups=4)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


@pytest.mark.parametrize("kw, inner, qtype, groups", [
    ({"bits": 4, "group_size": 128}, "Int4Linear", "qint4", [128, 96, None]),
    ({"bits": 4, "symmetric": False}, "Int4Linear", "qint4", [128, 96, None]),
    ({"bits": 2, "group_size": 128, "symmetric": False}, "QLinear", "qint2", [128, 96, None]),
    ({"bits": 8}, "QLinear", "qint8", [None] * 3),
    ({"format": "fp8_e4m3"}, "FP8Linear", "qfloat8_e4m3fn", [None] * 3),
])
def test_conv_maps_onto_quanto_qconv2d(kw, inner, qtype, groups, tmp_path):
    from safetensors.torch import load_file

    from compress.io.quanto_export import save_quanto, to_quanto
    from compress.modules.qconv import QConv2d

    torch.manual_seed(0)
    ours, fresh = Convs(), Convs()
    fresh.load_state_dict(ours.state_dict())
    for n in ("a", "b", "c"):
        setattr(ours, n, QConv2d.from_conv(getattr(ours, n), **kw))
    assert {type(getattr(ours, n).wq).__name__ for n in ("a", "b", "c")} == {inner}
    x = torch.randn(2, 16, 12, 12)
    with torch.no_grad():
        ref = ours(x)
    w_ours = {n: getattr(ours, n).dequantized_weight() for n in ("a", "b", "c")}
    save_quanto(to_quanto(ours), tmp_path / "q")
    qmap = json.loads((tmp_path / "q" / "quanto_qmap.json").read_text())
    assert qmap == {n: {"weights": qtype, "activations": "none"} for n in ("a", "b", "c")}
    quanto.requantize(fresh, load_file(str(tmp_path / "q" / "diffusion_pytorch_model.safetensors")),
                      qmap)
    for n, g in zip(("a", "b", "c"), groups, strict=True):
        m = getattr(fresh, n)
        assert isinstance(m, quanto.QConv2d) and m.weight_group_size == g
        assert torch.equal(m.weight.dequantize(), w_ours[n]), n
    assert fresh.b.bias is None and torch.equal(fresh.a.bias, ours.a.bias)
    with torch.no_grad():
        assert torch.allclose(fresh(x), ref, rtol=0, atol=1e-5 * ref.abs().max().item())
