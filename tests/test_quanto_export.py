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
    n = 0
    for name, m in ours.named_modules():
        if hasattr(m, "dequantized_weight"):
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
    }


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
