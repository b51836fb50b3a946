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
from compress.io.manifest import seal


class Net(nn.Module):
    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(),
                                                   nn.Linear(2 * width, width))
                                     for _ in range(3)])

    def forward(self, x):
        for b in self.blocks:
            x = x + b(x)
        return x


def _net(width: int = 32) -> Net:
    torch.manual_seed(0)
    return Net(width).eval()


def _build(tmp_path: Path, width: int) -> Path:
    recipe = {"name": "w8", "passes": [{"ptq": {"include": ["re:blocks\\..*"]}}],
              "eval": {"enabled": False, "latency": False}}
    compress.run_recipe(recipe, model=_net(width), out=tmp_path / "o",
                        calibrate_fn=lambda m: m(torch.randn(4, width)))
    return tmp_path / "o"


@pytest.fixture
def out(tmp_path) -> Path:
    return _build(tmp_path, 32)


def _weights(out: Path) -> Path:
    return out / "diffusion_pytorch_model.safetensors"


def _edit_manifest(out: Path, change, reseal: bool = True) -> None:
    """Edit the manifest as a careful attacker would: the change, then a fresh seal."""
    mp = out / "compress_manifest.json"
    m = json.loads(mp.read_text())
    change(m)
    mp.write_text(json.dumps(seal(m) if reseal else m))


def test_manifest_records_every_file(out):
    m = json.loads((out / "compress_manifest.json").read_text())
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert set(m["files"]) == files - {"compress_manifest.json"}
    from compress.io.integrity import sha256

    assert all(m["files"][f]["sha256"] == sha256(out / f) for f in m["files"])
    assert cli(["verify", str(out)]) == 0


def test_flipped_byte_beyond_the_head_found_by_verify_and_named(tmp_path, capsys):
    out = _build(tmp_path, 512)  # int8 weights of 3 MiB: the body lies beyond the 1 MiB head
    w = _weights(out)
    m = json.loads((out / "compress_manifest.json").read_text())
    data = bytearray(w.read_bytes())
    at = len(data) - 5
    assert at > m["files"][w.name]["head"][0]
    data[at] ^= 0x01
    w.write_bytes(bytes(data))
    compress.load_module(out, _net(512))  # sizes and heads only: the default cannot see it
    with pytest.raises(UserError, match=r"diffusion_pytorch_model\.safetensors.*SHA-256"):
        compress.load_module(out, _net(512), verify=True)
    assert cli(["verify", str(out)]) == 2
    assert "SHA-256" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["header", "small-file body"])
def test_flipped_byte_in_the_head_refused_by_default(out, where):
    w = _weights(out)
    data = bytearray(w.read_bytes())
    n = int.from_bytes(data[:8], "little")
    at = 8 + n // 2 if where == "header" else len(data) - 5  # the whole small file is the head
    data[at] ^= 0x01
    w.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"diffusion_pytorch_model\.safetensors.*header"):
        compress.load_module(out, _net())


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
    _edit_manifest(out, lambda m: m["files"].update(
        {bad: {"size": 1, "sha256": "0" * 64, "head": [1, "0" * 64]}}))
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
    with pytest.raises(UserError, match="symlink leading outside the output folder"):
        compress.load_module(out, _net())


def test_manifest_without_files_is_refused(out):
    _edit_manifest(out, lambda m: m.pop("files"))
    with pytest.raises(UserError, match="files: Field required"):
        compress.load_module(out, _net())
    _edit_manifest(out, lambda m: m.update(files={}))
    with pytest.raises(UserError, match="lists no files"):
        compress.load_module(out, _net())


def test_edited_manifest_without_a_fresh_seal_is_refused(out):
    _edit_manifest(out, lambda m: m.update(family="flux"), reseal=False)
    with pytest.raises(UserError, match="manifest_sha256 does not match"):
        compress.load_module(out, _net())


def test_resealed_bits_change_refused_by_the_stored_tensors(out):
    def to_4_bits(m):
        for layer in m["passes"][0]["meta"]["layers"].values():
            layer["bits"] = 4
    _edit_manifest(out, to_4_bits)
    with pytest.raises(UserError, match="stored"):
        compress.load_module(out, _net())


@pytest.mark.parametrize("version, says", [(3, "upgrade dit-compress"), (1, "re-run"),
                                           ("2", "re-run")])
def test_other_format_versions_refused(out, version, says):
    _edit_manifest(out, lambda m: m.update(format_version=version))
    with pytest.raises(UserError, match=says):
        compress.load_module(out, _net())


def test_unknown_pass_in_the_manifest_refused(out):
    _edit_manifest(out, lambda m: m["passes"][0].update(name="frobnicate"))
    with pytest.raises(UserError, match="frobnicate"):
        compress.load_module(out, _net())


def test_too_little_free_space_refused_before_calibration(tmp_path, monkeypatch):
    import collections

    from compress.io import save

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(save.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    called = []
    recipe = {"name": "w8", "passes": [{"ptq": {"include": ["re:blocks\\..*"]}}],
              "eval": {"enabled": False, "latency": False}}
    with pytest.raises(UserError, match="MB free in .*may take up to"):
        compress.run_recipe(recipe, model=_net(), out=tmp_path / "o",
                            calibrate_fn=lambda m: called.append(1))
    assert not called and not (tmp_path / "o").exists()


@pytest.mark.parametrize("head", [[10**9, "0" * 64], ["x", 1], [-1, "0" * 64]])
def test_resealed_file_entry_with_an_impossible_head_refused(out, head):
    _edit_manifest(out, lambda m: m["files"][_weights(out).name].update(head=head))
    with pytest.raises(UserError, match="head"):
        compress.load_module(out, _net())
