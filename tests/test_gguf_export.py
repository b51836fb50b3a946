"""export-gguf: a ptq output of SD3, FLUX and Sana written as GGUF loads with stock diffusers'
from_single_file + GGUFQuantizationConfig and gives our images; int8 per-channel and
symmetric int4 and int5 codes carry over bit for bit; a plain model exports at one type; classes diffusers
cannot load from one file, and non-ptq outputs without --type, are refused before writing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import compress
from compress.errors import UserError

gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
TINY = {"calibration": {"num_prompts": 2, "steps": 3},
        "eval": {"num_prompts": 2, "steps": 3, "latency": False}}


def _load_gguf(cls, path, out):
    from diffusers import GGUFQuantizationConfig

    return cls.from_single_file(str(path), config=str(out), subfolder="transformer",
                                quantization_config=GGUFQuantizationConfig(
                                    compute_dtype=torch.float32),
                                torch_dtype=torch.float32)


@pytest.mark.parametrize(("family", "weights"), [
    ("sd3", {"bits": 8}), ("flux", {"bits": 4, "group_size": 32}), ("sana", {"bits": 8}),
    ("flux", {"bits": 4, "group_size": 32, "symmetric": False}),
    ("sana", {"bits": 5, "group_size": 32})])
def test_exported_gguf_loads_in_diffusers_with_our_images(family, weights, tiny_pipeline_dir,
                                                          tmp_path, monkeypatch):
    from diffusers import DiffusionPipeline

    from compress.io.gguf_export import export_gguf
    from compress.models import load_model

    monkeypatch.setenv("DIT_COMPRESS_CACHE", str(tmp_path / "cache"))
    src = str(tiny_pipeline_dir(family))
    rep = compress.run_recipe({"name": "g", **TINY, "passes": [{"ptq": {"weights": weights}}]},
                              src, tmp_path / "o")
    r = export_gguf(tmp_path / "o", tmp_path / "m.gguf")
    assert r["carried"] and not r["requantised"]  # our codes, unchanged
    # the file holds our codes: dequantised by gguf, they are our weights exactly
    ours = compress.load_pipeline(tmp_path / "o").transformer
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    for t in reader.tensors:
        layer = t.name.rpartition(".")[0]
        if layer in r["carried"] and t.name.endswith(".weight"):
            w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(-1)
            want = ours.get_submodule(layer).dequantized_weight(torch.float32).reshape(-1)
            if weights.get("symmetric", True):
                assert t.tensor_type.name == {8: "Q8_0", 5: "Q5_0", 4: "Q4_0"}[weights["bits"]]
                assert np.array_equal(w, want.numpy())
            else:  # Q4_1: the same codes and scales; its minimum (-zero x scale) is fp16
                assert t.tensor_type.name == "Q4_1"
                assert np.abs(w - want.numpy()).max() <= 2e-3 * np.abs(want.numpy()).max()
    handle = load_model(src)
    tr = _load_gguf(type(handle.transformer), tmp_path / "m.gguf", tmp_path / "o")
    pipe = DiffusionPipeline.from_pretrained(src, transformer=tr)
    ev = rep["eval"]
    got = handle.adapter.generate(pipe, ev["prompts"], ev["seeds"], ev["steps"], ev["guidance"],
                                  ev["resolution"])
    assert np.abs(got - rep["_student_images"]).max() < 1e-3


def test_plain_model_exports_at_one_type_and_bad_requests_are_refused(tiny_pipeline_dir,
                                                                     tmp_path, monkeypatch):
    from diffusers import DiffusionPipeline

    from compress.cli import main
    from compress.models import load_model

    monkeypatch.setenv("DIT_COMPRESS_CACHE", str(tmp_path / "cache"))
    src = tiny_pipeline_dir("sd3")
    assert main(["export-gguf", str(src), str(tmp_path / "q8.gguf"), "--type", "Q8_0"]) == 0
    types = {t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "q8.gguf")).tensors}
    assert "Q8_0" in types
    handle = load_model(str(src))
    tr = _load_gguf(type(handle.transformer), tmp_path / "q8.gguf", src)
    a = DiffusionPipeline.from_pretrained(src, transformer=tr)
    args = (["a red cube"], [0], 3, None, None)
    psnr = _psnr(handle.adapter.generate(a, *args), handle.adapter.generate(handle.pipeline, *args))
    assert psnr > 35  # Q8_0 of the original: close, not identical
    from compress.io.gguf_export import export_gguf

    for kwargs, msg in [({"source": tiny_pipeline_dir("pixart"), "qtype": "Q8_0"},
                         "cannot load a PixArtTransformer2DModel from a single file"),
                        ({"source": src}, "give --type"),
                        ({"source": src, "qtype": "Q3_K"}, "choose one of")]:
        with pytest.raises(UserError, match=msg):
            export_gguf(dest=tmp_path / "x.gguf", **kwargs)
    with pytest.raises(UserError, match="exists"):
        export_gguf(src, tmp_path / "q8.gguf", qtype="Q8_0")
    assert not (tmp_path / "x.gguf").exists()


def _psnr(a, b) -> float:
    mse = float(np.mean((np.asarray(a) - np.asarray(b)) ** 2))
    return 10 * np.log10(1 / max(mse, 1e-12))


def test_sd3_writes_the_original_layout_that_diffusers_converts_back(tiny_pipeline_dir, tmp_path,
                                                                    monkeypatch):
    """SD3 goes out in the reference checkpoint's names and shapes (fused qkv, joint_blocks,
    shift-first final adaLN; architecture "sd3": what ComfyUI-GGUF reads): diffusers converts it
    back to our weights. Row blocks of one stack at different bits share the most precise
    type (to_q at 4 bits beside 8-bit to_k/to_v: the stack is Q8_0, to_q re-quantised)."""
    from compress.io.gguf_export import export_gguf
    from compress.models import load_model

    monkeypatch.setenv("DIT_COMPRESS_CACHE", str(tmp_path / "cache"))
    src = str(tiny_pipeline_dir("sd3"))
    compress.run_recipe({"name": "g", **TINY, "passes": [{"ptq": {
        "weights": {"bits": 8},
        "overrides": {"re:.*attn\\.to_q$": {"bits": 4, "granularity": "group",
                                            "group_size": 32}}}}]}, src, tmp_path / "o")
    r = export_gguf(tmp_path / "o", tmp_path / "m.gguf")
    d = export_gguf(tmp_path / "o", tmp_path / "d.gguf", layout="diffusers")
    assert r["layout"] == "original" and d["layout"] == "diffusers"
    assert "transformer_blocks.0.attn.to_q" in r["requantised"]
    assert "transformer_blocks.0.attn.to_q" not in d["requantised"]
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    names = {t.name: t for t in reader.tensors}
    arch = reader.fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "sd3"
    assert not any(n.startswith("transformer_blocks.") for n in names)
    qkv = names["joint_blocks.0.x_block.attn.qkv.weight"]
    assert qkv.tensor_type.name == "Q8_0"
    ours = compress.load_pipeline(tmp_path / "o").transformer
    attn = ours.transformer_blocks[0].attn
    w = gguf.quants.dequantize(qkv.data, qkv.tensor_type).reshape(3, -1)
    for i, lin in enumerate((attn.to_q, attn.to_k, attn.to_v)):
        want = lin.dequantized_weight(torch.float32).reshape(-1).numpy()
        tol = 0.0 if i else 0.01 * np.abs(want).max()  # k, v carried; q re-quantised to 8 bits
        assert np.abs(w[i] - want).max() <= tol
    cls = type(load_model(src).transformer)
    x = _load_gguf(cls, tmp_path / "m.gguf", tmp_path / "o").state_dict()
    y = _load_gguf(cls, tmp_path / "d.gguf", tmp_path / "o").state_dict()
    assert x.keys() == y.keys()
    for n, a in x.items():  # the same tensors once diffusers converted the original layout back
        b = y[n]
        if n.endswith("to_q.weight"):
            continue  # 8-bit in one file, 4-bit in the other
        a = a.dequantize() if hasattr(a, "quant_type") and hasattr(a, "dequantize") else a
        b = b.dequantize() if hasattr(b, "quant_type") and hasattr(b, "dequantize") else b
        assert torch.equal(torch.as_tensor(a).float(), torch.as_tensor(b).float()), n


def test_flux_original_layout_is_what_diffusers_converter_reads(tiny_pipeline_dir, tmp_path,
                                                                 monkeypatch):
    """FLUX's original layout (double_blocks qkv, single blocks' linear1 = [q|k|v|mlp], linear2,
    shift-first final adaLN), read back by diffusers' own FLUX converter, gives the tensors of
    the diffusers-layout file. The converter assumes FLUX.1's width (3072), so the test runs a
    copy of it at the tiny model's width; "auto" keeps diffusers' layout for such a model."""
    import inspect

    from diffusers.loaders import single_file_utils as sfu

    from compress.io.gguf_export import export_gguf

    monkeypatch.setenv("DIT_COMPRESS_CACHE", str(tmp_path / "cache"))
    src = str(tiny_pipeline_dir("flux"))
    compress.run_recipe({"name": "g", **TINY, "passes": [{"ptq": {
        "weights": {"bits": 4, "granularity": "group", "group_size": 32}}}]}, src, tmp_path / "o")
    assert export_gguf(tmp_path / "o", tmp_path / "a.gguf")["layout"] == "diffusers"
    export_gguf(tmp_path / "o", tmp_path / "o.gguf", layout="original")
    export_gguf(tmp_path / "o", tmp_path / "d.gguf", layout="diffusers")

    def read(path):
        return {t.name: torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type)))
                for t in gguf.GGUFReader(str(path)).tensors}

    orig, want = read(tmp_path / "o.gguf"), read(tmp_path / "d.gguf")
    assert any(k.startswith("single_blocks.0.linear1.") for k in orig)
    cfg = compress.load_pipeline(tmp_path / "o").transformer.config
    width = cfg.num_attention_heads * cfg.attention_head_dim
    code = inspect.getsource(sfu.convert_flux_transformer_checkpoint_to_diffusers)
    assert "inner_dim = 3072" in code
    ns = dict(vars(sfu))
    exec(code.replace("inner_dim = 3072", f"inner_dim = {width}"), ns)  # noqa: S102
    got = ns["convert_flux_transformer_checkpoint_to_diffusers"](dict(orig))
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k].reshape(want[k].shape), want[k]), k


def test_a_tensor_the_original_layout_lacks_is_refused_without_a_file(tiny_pipeline_dir, tmp_path,
                                                                      monkeypatch):
    from compress.io import gguf_layout
    from compress.io.gguf_export import export_gguf

    monkeypatch.setenv("DIT_COMPRESS_CACHE", str(tmp_path / "cache"))
    compress.run_recipe({"name": "g", **TINY, "passes": [{"ptq": {"weights": {"bits": 8}}}]},
                        str(tiny_pipeline_dir("sd3")), tmp_path / "o")
    arch, rules = gguf_layout.LAYOUTS["SD3Transformer2DModel"]
    monkeypatch.setitem(gguf_layout.LAYOUTS, "SD3Transformer2DModel",
                        (arch, [r for r in rules if not r[0].startswith("proj_out")]))
    with pytest.raises(UserError, match=r"proj_out\.weight has no place.*--layout diffusers"):
        export_gguf(tmp_path / "o", tmp_path / "m.gguf")
    assert not list(tmp_path.glob("m.gguf*"))
    assert export_gguf(tmp_path / "o", tmp_path / "m.gguf", layout="diffusers")["bytes"] > 0


def test_mixed_precision_at_the_size_of_q4_0_exports_no_larger_than_q4_0(tiny_pipeline_dir,
                                                                         tmp_path, monkeypatch):
    """gguf-q4-mp's budget is the original's Q4_0 file: our per-layer file (codes carried as
    Q4_0/Q5_0/Q8_0, layers GGUF cannot block counted as the F32 they are written as) holds no
    more tensor bytes than `export-gguf MODEL --type Q4_0`, and spends most of that budget."""
    from compress.io.gguf_export import export_gguf

    monkeypatch.setenv("DIT_COMPRESS_CACHE", str(tmp_path / "cache"))
    src = str(tiny_pipeline_dir("sana"))
    recipe = yaml.safe_load(Path("recipes/gguf-q4-mp.yaml").read_text())
    recipe.update(TINY)
    recipe["passes"][0]["ptq"]["mixed_precision"]["image_steps"] = 2
    rep = compress.run_recipe(recipe, src, tmp_path / "o")
    mp = rep["passes"][0]["mixed_precision"]
    assert mp["budget_size_of"] == "Q4_0" and mp["budget_met"]
    assert any(row["bits"] > 4 for row in mp["table"])
    export_gguf(tmp_path / "o", tmp_path / "ours.gguf")
    export_gguf(src, tmp_path / "q4.gguf", qtype="Q4_0")

    def tensor_bytes(path):
        return sum(int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors)

    ours, plain = tensor_bytes(tmp_path / "ours.gguf"), tensor_bytes(tmp_path / "q4.gguf")
    assert ours <= plain
    # the budget is spent, not left over: well above the cheapest allocation's bytes
    assert mp["avg_bits"] > mp["cheapest_avg_bits"] + 4
    assert ours >= 0.85 * plain
    types = {t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "ours.gguf")).tensors}
    assert types & {"Q5_0", "Q8_0"} and types <= {"Q4_0", "Q5_0", "Q8_0", "F32"}
