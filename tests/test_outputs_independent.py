"""An output is independent of its input: every file it holds is its own (no hard link into
the input model or the package), and copying a model folder refuses symlink loops."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import compress
from compress.errors import UserError
from compress.io.files import copy_tree

RECIPE = {"name": "w8", "passes": [{"ptq": {}}], "eval": {"enabled": False, "latency": False},
          "calibration": {"num_prompts": 1, "steps": 2}}


def _inodes(root: Path) -> set[tuple[int, int]]:
    return {(f.stat().st_dev, f.stat().st_ino) for f in root.rglob("*") if f.is_file()}


def test_pipeline_output_shares_no_file_with_its_input(tiny_pipeline_dir, tmp_path):
    src = tiny_pipeline_dir("pixart")
    before = {f: f.read_bytes() for f in src.rglob("*") if f.is_file()}
    compress.run_recipe(RECIPE, model=src, out=tmp_path / "o")
    out = tmp_path / "o"
    assert not _inodes(out) & _inodes(src)
    assert all(f.stat().st_nlink == 1 for f in out.rglob("*") if f.is_file())
    for f in out.rglob("*"):  # editing the output leaves the input as it was
        if f.is_file() and "transformer" not in f.parts:
            f.write_bytes(b"edited")
    assert all(f.read_bytes() == b for f, b in before.items())


def test_demo_output_shares_no_file_with_the_package(tmp_path):
    from compress import demo

    compress.run_recipe(RECIPE, model="demo", out=tmp_path / "o")
    pkg = Path(demo.__file__).parent
    from compress.demo.text import text_encoder_dir

    shipped = _inodes(pkg) | _inodes(Path(text_encoder_dir()))
    assert not _inodes(tmp_path / "o") & shipped


def test_copy_tree_follows_links_and_refuses_loops(tmp_path):
    src = tmp_path / "m"
    (src / "vae").mkdir(parents=True)
    (src / "vae" / "w.bin").write_bytes(b"123")
    elsewhere = tmp_path / "shared.json"
    elsewhere.write_text("{}")
    os.symlink(elsewhere, src / "vae" / "config.json")
    copy_tree(src, tmp_path / "c1")
    got = tmp_path / "c1" / "vae" / "config.json"
    assert not got.is_symlink() and got.read_text() == "{}"
    os.symlink("..", src / "vae" / "loop")
    with pytest.raises(UserError, match="symlink loop"):
        copy_tree(src, tmp_path / "c2")
    (src / "vae" / "loop").unlink()
    os.symlink(tmp_path / "gone", src / "vae" / "dangling")
    with pytest.raises(UserError, match="broken symlink"):
        copy_tree(src, tmp_path / "c3")


def test_model_folder_with_a_loop_is_refused_before_any_work(tiny_pipeline_dir, tmp_path):
    import shutil

    src = tmp_path / "model"
    shutil.copytree(tiny_pipeline_dir("pixart"), src)
    os.symlink("..", src / "vae" / "loop")
    with pytest.raises(UserError, match="symlink loop"):
        compress.run_recipe(RECIPE, model=src, out=tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_stock_diffusers_refuses_a_quantised_output_by_name(tiny_pipeline_dir, tmp_path):
    from diffusers import DiffusionPipeline

    compress.run_recipe(RECIPE, model=tiny_pipeline_dir("pixart"), out=tmp_path / "o")
    with pytest.raises(Exception, match="LoadWith_compress_load_pipeline"):
        DiffusionPipeline.from_pretrained(tmp_path / "o")
    pipe = compress.load_pipeline(tmp_path / "o")  # ours still loads it
    assert type(pipe.transformer).__name__ == "PixArtTransformer2DModel"
    import diffusers

    assert not hasattr(diffusers, "QuantizedByDitCompress_LoadWith_compress_load_pipeline")
