"""Outputs are checked when read: the manifest records every file's size and SHA-256; a load
checks sizes, verify=True and `dit-compress verify` hashes too; paths from an output stay in it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

import compress
from compress.cli import main as cli
from compress.errors import UserError


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(32, 64), nn.GELU(),
                                                   nn.Linear(64, 32)) for _ in range(3)])

    def forward(self, x):
        for b in self.blocks:
            x = x + b(x)
        return x


def _net() -> Net:
    torch.manual_seed(0)
    return Net().eval()


@pytest.fixture
def out(tmp_path) -> Path:
    recipe = {"name": "w8", "passes": [{"ptq": {"include": ["re:blocks\\..*"]}}],
              "eval": {"enabled": False, "latency": False}}
    compress.run_recipe(recipe, model=_net(), out=tmp_path / "o",
                        calibrate_fn=lambda m: m(torch.randn(4, 32)))
    return tmp_path / "o"


def _weights(out: Path) -> Path:
    return out / "diffusion_pytorch_model.safetensors"


def test_manifest_records_every_file(out):
    m = json.loads((out / "compress_manifest.json").read_text())
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert set(m["files"]) == files - {"compress_manifest.json"}
    from compress.io.integrity import sha256

    assert all(m["files"][f]["sha256"] == sha256(out / f) for f in m["files"])
    assert cli(["verify", str(out)]) == 0


def test_flipped_byte_found_by_verify_and_named(out, capsys):
    w = _weights(out)
    data = bytearray(w.read_bytes())
    data[len(data) // 2 + 5] ^= 0x01  # in the tensor data, far from the header
    w.write_bytes(bytes(data))
    compress.load_module(out, _net())  # sizes only: the default cannot see it
    with pytest.raises(UserError, match=r"diffusion_pytorch_model\.safetensors.*SHA-256"):
        compress.load_module(out, _net(), verify=True)
    assert cli(["verify", str(out)]) == 2
    assert "SHA-256" in capsys.readouterr().err


def test_truncated_file_refused_by_default(out):
    w = _weights(out)
    w.write_bytes(w.read_bytes()[:-7])
    with pytest.raises(UserError, match="bytes, the manifest says"):
        compress.load_module(out, _net())


def test_edited_report_only_fails_verify(out):
    (out / "report.md").write_text("edited")
    compress.load_module(out, _net())
    assert cli(["verify", str(out)]) == 2


@pytest.mark.parametrize("bad", ["../../../../etc/passwd", "/etc/passwd", "../o2/x"])
def test_paths_outside_the_output_are_refused(out, bad):
    mp = out / "compress_manifest.json"
    m = json.loads(mp.read_text())
    m["files"][bad] = {"size": 1, "sha256": "0" * 64}
    mp.write_text(json.dumps(m))
    with pytest.raises(UserError, match="outside the output folder"):
        compress.load_module(out, _net())


def test_shard_index_confined(out, tmp_path):
    elsewhere = tmp_path / "other.safetensors"
    elsewhere.write_bytes(_weights(out).read_bytes())
    index = out / "diffusion_pytorch_model.safetensors.index.json"
    for target in (str(elsewhere), "../other.safetensors"):
        index.write_text(json.dumps({"weight_map": {"a": target}}))
        with pytest.raises(UserError, match="outside the output folder"):
            compress.load_module(out, _net())


def test_symlink_leaving_the_output_is_refused(out, tmp_path):
    w = _weights(out)
    moved = tmp_path / "moved.safetensors"
    os.replace(w, moved)
    os.symlink(moved, w)
    with pytest.raises(UserError, match="leads outside the output folder"):
        compress.load_module(out, _net())


def test_manifest_without_files_is_refused(out):
    mp = out / "compress_manifest.json"
    m = json.loads(mp.read_text())
    del m["files"]
    mp.write_text(json.dumps(m))
    with pytest.raises(UserError, match="lists no files"):
        compress.load_module(out, _net())
