"""export-gguf: a ptq output of SD3, FLUX and Sana written as GGUF loads with stock diffusers'
from_single_file + GGUFQuantizationConfig and gives our images; int8 per-channel and
symmetric int4 codes carry over bit for bit; a plain model exports at one type; classes diffusers
cannot load from one file, and non-ptq outputs without --type, are refused before writing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

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
    ("flux", {"bits": 4, "group_size": 32, "symmetric": False})])
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
