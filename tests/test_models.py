"""Family adapters, load_model and inspect on every family's tiny pipeline."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_pipelines import FAMILIES, TINY_RESOLUTION, build_tiny_pipeline
from torch import nn

from compress.errors import UserError
from compress.models import ADAPTERS, adapter_for, load_model
from compress.models.base import ROLES, ModelHandle
from compress.models.dit import class_id
from compress.models.generic import ADAPTER as GENERIC
from compress.models.inspect import format_inspect, inspect_model

WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def handles(tiny_pipeline_dir) -> dict[str, ModelHandle]:
    """Loaded lazily, once per family."""
    cache: dict[str, ModelHandle] = {}

    class Lazy(dict):
        def __missing__(self, family: str) -> ModelHandle:
            cache[family] = load_model(tiny_pipeline_dir(family))
            self[family] = cache[family]
            return cache[family]

    return Lazy()


def _user_error(fn, *needles: str) -> str:
    """Runs ``fn``, expects a one-line UserError that contains every needle."""
    with pytest.raises(UserError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    return msg


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


# ----------------------------------------------------------------------------- per family


@pytest.mark.parametrize("family", FAMILIES)
def test_family_layout(family: str, handles) -> None:
    h = handles[family]
    tr = h.transformer
    assert h.family == family and adapter_for(tr) is ADAPTERS[family]
    layers = list(h.adapter.weight_layers(tr))
    assert layers
    unroled = [n for n, _, r in layers if r == "other"]
    assert not unroled, f"{family}: layers with no role: {unroled}"
    assert {r for _, _, r in layers} <= set(ROLES)
    # Every family has attention, a feed-forward, conditioning and an embedding.
    assert {"attn_qkv", "ff_in", "ff_out", "adaln", "embed", "proj_out"} <= {r for *_, r in layers}

    blocks = h.adapter.blocks(tr)
    expected = sum(int(tr.config[k]) for k in h.adapter.layer_config_keys.values())
    assert len(blocks) == expected >= 2
    for attr, key in h.adapter.layer_config_keys.items():
        assert attr in h.adapter.block_lists and len(getattr(tr, attr)) == tr.config[key]
    # Block names resolve back to the same modules.
    for name, block in blocks:
        assert tr.get_submodule(name) is block


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_deterministic(family: str, handles) -> None:
    h = handles[family]
    prompts, seeds = ["a red cube", "a dog on the grass"], [0, 1]
    a = h.adapter.generate(h.pipeline, prompts, seeds, 2, None, None)
    b = h.adapter.generate(h.pipeline, prompts, seeds, 2, None, TINY_RESOLUTION)
    assert a.shape == (2, TINY_RESOLUTION, TINY_RESOLUTION, 3) and a.dtype == np.float32
    assert 0.0 <= a.min() and a.max() <= 1.0
    np.testing.assert_array_equal(a, b)
    # An image depends on its own prompt and seed only, not on the rest of the list.
    alone = h.adapter.generate(h.pipeline, prompts[1:], seeds[1:], 2, None, None)
    np.testing.assert_array_equal(a[1:], alone)
    other = h.adapter.generate(h.pipeline, prompts[:1], [7], 2, None, None)
    assert not np.array_equal(a[:1], other)


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_build_is_seeded(family: str, handles) -> None:
    sd = build_tiny_pipeline(family, seed=0).transformer.state_dict()
    loaded = handles[family].transformer.state_dict()
    assert sd.keys() == loaded.keys()
    assert all(torch.equal(sd[k], loaded[k]) for k in sd)


@pytest.mark.parametrize("family", FAMILIES)
def test_load_and_inspect(family: str, handles, tiny_pipeline_dir) -> None:
    root = tiny_pipeline_dir(family)
    h = handles[family]
    assert h.pipeline is not None and h.source == root and len(h.source_hash) == 64
    assert not h.transformer.training

    before = _snapshot(root)
    alone = load_model(root / "transformer")
    assert alone.pipeline is None and alone.family == family
    assert alone.source_hash != h.source_hash  # the pipeline hash covers the other components
    assert load_model(root).source_hash == h.source_hash
    assert _snapshot(root) == before  # loading never writes

    d = inspect_model(h)
    json.dumps(d)
    assert d["family"] == family and d["params"] == h.params()
    assert sum(d["params_per_role"].values()) == d["params"]
    assert len(d["blocks"]) == len(h.adapter.blocks(h.transformer))
    text = format_inspect(d)
    assert family in text and "attn_qkv" in text and "transformer_blocks.*." in text


# ----------------------------------------------------------------------------- DiT prompts


def test_dit_class_ids(handles) -> None:
    pipe = handles["dit"].pipeline
    assert class_id(pipe, "Red Cube") == 0
    assert class_id(pipe, "a photo of a kitty") == 2
    assert class_id(pipe, "a dog next to a red cube") == 0  # the longest label named wins
    n = int(pipe.transformer.config.num_embeds_ada_norm)
    # Labels count only as whole words: "hotdog" names no label, so it is hashed.
    digest = hashlib.sha256(b"hotdog").digest()
    assert class_id(pipe, "hotdog") == int.from_bytes(digest[:8], "big") % n
    c = class_id(pipe, "an astronaut riding a horse")
    assert 0 <= c < n and c == class_id(pipe, "an astronaut riding a horse")
    _user_error(
        lambda: ADAPTERS["dit"].generate(pipe, ["dog"], [0], 1, None, 64), "DiT", "64", "native"
    )


# ----------------------------------------------------------------------------- adapters


def test_adapter_for_and_generic() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.Module()
            self.attn.qkv = nn.Linear(8, 24)
            self.attn.proj = nn.Linear(8, 8)
            self.mlp = nn.Module()
            self.mlp.fc1, self.mlp.fc2 = nn.Linear(8, 32), nn.Linear(32, 8)
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(8, 48))

    class Toy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.x_embedder = nn.Conv2d(4, 8, 2, 2)
            self.blocks = nn.ModuleList([Block(), Block()])
            self.head = nn.Linear(8, 4)

    toy = Toy()
    _user_error(lambda: adapter_for(toy), "Toy", "PixArtTransformer2DModel")
    assert adapter_for(toy, allow_generic=True) is GENERIC
    roles = {n: r for n, _, r in GENERIC.weight_layers(toy)}
    assert roles["blocks.0.attn.qkv"] == "attn_qkv" and roles["blocks.1.attn.proj"] == "attn_out"
    assert roles["blocks.0.mlp.fc1"] == "ff_in" and roles["blocks.0.mlp.fc2"] == "ff_out"
    assert roles["blocks.0.adaLN_modulation.1"] == "adaln" and roles["x_embedder"] == "embed"
    assert roles["head"] == "other"
    assert [n for n, _ in GENERIC.blocks(toy)] == ["blocks.0", "blocks.1"]
    assert GENERIC.generate is None


# ----------------------------------------------------------------------------- load errors


@pytest.fixture()
def tdir(tiny_pipeline_dir, tmp_path: Path) -> Path:
    """A writable copy of the tiny DiT transformer directory."""
    return Path(shutil.copytree(tiny_pipeline_dir("dit") / "transformer", tmp_path / "tr"))


def test_load_missing_and_not_diffusers(tmp_path: Path) -> None:
    _user_error(lambda: load_model(tmp_path / "nope"), str(tmp_path / "nope"), "no such")
    (tmp_path / "notes.txt").write_text("hello")
    _user_error(lambda: load_model(tmp_path), str(tmp_path), "not a diffusers")
    _user_error(lambda: load_model(tmp_path / "notes.txt"), "notes.txt", "is a file")
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))  # a transformers model
    _user_error(lambda: load_model(tmp_path), str(tmp_path), "not a diffusers")


def test_load_unsupported_class(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    _user_error(lambda: load_model(tmp_path), str(tmp_path), "UNet2DConditionModel", "supported")
    pipe = tmp_path / "pipe"
    pipe.mkdir()
    index = {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (pipe / "model_index.json").write_text(json.dumps(index))
    _user_error(lambda: load_model(pipe), str(pipe), "no transformer", "UNet2DConditionModel")


def test_load_refuses_custom_code(tiny_pipeline_dir, tmp_path: Path) -> None:
    pipe = Path(shutil.copytree(tiny_pipeline_dir("dit"), tmp_path / "p"))
    index = json.loads((pipe / "model_index.json").read_text())
    index["vae"] = ["my_vae", "MyVAE"]
    (pipe / "model_index.json").write_text(json.dumps(index))
    _user_error(lambda: load_model(pipe), "model_index.json", "my_vae", "custom code")


def test_load_truncated_safetensors(tdir: Path) -> None:
    f = tdir / WEIGHTS
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    _user_error(lambda: load_model(tdir), str(f), "truncated or corrupted")
    f.write_bytes(data[:5])
    _user_error(lambda: load_model(tdir), str(f), "truncated or corrupted")
    f.write_bytes((10**9).to_bytes(8, "little") + data[8:])  # header length past the end
    _user_error(lambda: load_model(tdir), str(f), "truncated or corrupted")
    f.write_bytes(data[:8] + b"{" * 8 + data[16:])  # header no longer JSON
    _user_error(lambda: load_model(tdir), str(f), "truncated or corrupted")


def test_load_truncated_in_pipeline(tiny_pipeline_dir, tmp_path: Path) -> None:
    pipe = Path(shutil.copytree(tiny_pipeline_dir("dit"), tmp_path / "p"))
    f = pipe / "vae" / WEIGHTS
    f.write_bytes(f.read_bytes()[:-4])
    _user_error(lambda: load_model(pipe), str(f), "truncated or corrupted")


def test_load_pickle_only(tdir: Path, tiny_pipeline_dir, tmp_path: Path) -> None:
    (tdir / WEIGHTS).unlink()
    # Content never matters: the file must be refused before anything reads it.
    (tdir / "diffusion_pytorch_model.bin").write_bytes(b"not really a pickle")
    _user_error(lambda: load_model(tdir), "diffusion_pytorch_model.bin", "safetensors only")

    pipe = Path(shutil.copytree(tiny_pipeline_dir("dit"), tmp_path / "p"))
    (pipe / "transformer" / WEIGHTS).unlink()
    (pipe / "transformer" / "diffusion_pytorch_model.ckpt").write_bytes(b"x")
    _user_error(lambda: load_model(pipe), "diffusion_pytorch_model.ckpt", "safetensors only")


def test_load_no_weights_and_bad_dtype(tdir: Path) -> None:
    _user_error(lambda: load_model(tdir, dtype="int3"), "int3")
    (tdir / WEIGHTS).unlink()
    _user_error(lambda: load_model(tdir), str(tdir), "no *.safetensors")


def test_load_dtype(tdir: Path) -> None:
    h = load_model(tdir, dtype="bf16")
    assert next(h.transformer.parameters()).dtype == torch.bfloat16


def test_source_hash_sees_changed_weights(tmp_path) -> None:
    # caches (calibration, teacher images) key on this hash: same shapes, new values -> new hash
    from safetensors.torch import load_file, save_file

    from compress.models.load import source_hash

    d = tmp_path / "t"
    d.mkdir()
    f = d / "diffusion_pytorch_model.safetensors"
    sd = {"w": torch.zeros(4, 4)}
    save_file(sd, str(f))
    (d / "config.json").write_text("{}")
    h0 = source_hash(d, d, [])
    sd = load_file(str(f))
    sd["w"][0, 0] = 1.0
    save_file(sd, str(f))
    assert source_hash(d, d, []) != h0


@pytest.mark.parametrize("change", [{"num_layers": 3}, {"attention_head_dim": 32}])
def test_config_disagreeing_with_weights_is_one_line(tiny_pipeline_dir, tmp_path, change):
    import json
    import shutil

    from compress.errors import UserError
    from compress.models import load_model

    src = tmp_path / "m"
    shutil.copytree(tiny_pipeline_dir("pixart"), src)
    cfg = src / "transformer" / "config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), **change}))
    with pytest.raises(UserError) as info:
        load_model(str(src))
    msg = str(info.value)
    assert "\n" not in msg and ("lacks" in msg or "expected shape" in msg), msg
