"""The whole path on every family's tiny pipeline: capture, ptq, save, load, equal outputs;
and the CLI's exit codes for bad input (2, nothing written) and failed gates (1, report written)."""

import json
from pathlib import Path

import numpy as np
import pytest
from tiny_pipelines import FAMILIES

from compress.cli import main

ROOT = Path(__file__).resolve().parents[1]
W8 = str(ROOT / "recipes" / "w8.yaml")
TINY = [
    "calibration.num_prompts=1", "calibration.steps=2", "eval.num_prompts=2", "eval.steps=2",
    "eval.latency_repeats=1",
]
REQUIRED = {
    "schema", "recipe", "recipe_hash", "model", "passes", "size", "speed", "quality", "gates",
}


def _sets(extra=()):
    out = []
    for s in [*TINY, *extra]:
        out += ["--set", s]
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_run_save_load_bit_equal(family, tiny_pipeline_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("DIT_COMPRESS_CACHE", str(tmp_path / "cache"))
    import compress
    from compress.models import load_model

    src = tiny_pipeline_dir(family)
    out = tmp_path / "out"
    report = compress.run_recipe(W8, model=str(src), out=out, overrides=TINY + ["gates={}"])
    rep = json.loads((out / "report.json").read_text())
    assert REQUIRED <= set(rep)
    assert rep["size"]["bits_per_weight"] < 32
    assert rep["passes"][0]["layers_quantized"] > 0
    assert (out / "transformer" / "compress_manifest.json").is_file()
    assert (out / "report.md").is_file() and (out / "report.html").is_file()
    t = rep["timing"]  # the whole run's wall time and each phase's
    assert {"calibration", "original_samples", "passes", "evaluation", "latency"} <= \
        set(t["phases_seconds"])
    # each figure is rounded to the millisecond: half a millisecond each may add up
    assert sum(t["phases_seconds"].values()) <= \
        t["wall_seconds"] + 5e-4 * (len(t["phases_seconds"]) + 1) + 1e-9
    assert t["phases_seconds"]["passes"] >= t["passes_seconds"] - 0.05

    pipe = compress.load_pipeline(out)
    handle = load_model(str(src))
    ev = rep["eval"]
    images = handle.adapter.generate(pipe, ev["prompts"], ev["seeds"], ev["steps"],
                                     ev["guidance"], ev["resolution"])
    assert np.array_equal(images, report["_student_images"])


def test_cli_ok_and_gate_failure(tiny_pipeline_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DIT_COMPRESS_CACHE", str(tmp_path / "cache"))
    src = str(tiny_pipeline_dir("pixart"))
    out = tmp_path / "o1"
    assert main(["run", W8, "--model", src, "--out", str(out), *_sets(["gates={}"])]) == 0
    assert (out / "report.json").is_file()
    # refusing a non-empty --out without --force, then accepting it with --force
    assert main(["run", W8, "--model", src, "--out", str(out), *_sets()]) == 2
    assert "--force" in capsys.readouterr().err
    out2 = tmp_path / "o2"
    code = main(["run", W8, "--model", src, "--out", str(out2),
                 *_sets(["gates.psnr_vs_teacher='>= 1000'"])])
    assert code == 1
    rep = json.loads((out2 / "report.json").read_text())
    assert rep["gates"]["psnr_vs_teacher"]["passed"] is False


def test_cli_unknown_key_exits_2_and_writes_nothing(tiny_pipeline_dir, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\npasses:\n  - ptq:\n      weights: {bits: 8, colour: red}\n")
    out = tmp_path / "never"
    src = str(tiny_pipeline_dir("pixart"))
    capsys.readouterr()  # building the fixture may print; only the command's output counts
    code = main(["run", str(bad), "--model", src, "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "colour" in err[0] and "bad.yaml" in err[0]
    assert not out.exists()
    assert not list(tmp_path.glob(".never*"))


def test_cli_truncated_safetensors_exits_2(tiny_pipeline_dir, tmp_path, capsys):
    import shutil

    src = tmp_path / "model"
    shutil.copytree(tiny_pipeline_dir("pixart"), src)
    w = next((src / "transformer").glob("*.safetensors"))
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    out = tmp_path / "never"
    code = main(["run", W8, "--model", str(src), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and w.name in err[0]
    assert not out.exists()


def test_cli_out_that_is_a_mount_point_exits_2_before_any_work(tiny_pipeline_dir, tmp_path,
                                                              monkeypatch, capsys):
    # a mount point cannot be renamed aside at the end (EBUSY): refused before calibration
    import os

    from compress import runner

    out = tmp_path / "mnt"
    out.mkdir()
    real = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: Path(p) == out or real(p))
    monkeypatch.setattr(runner, "capture_calibration",
                        lambda *a, **k: pytest.fail("calibration ran"))
    src = str(tiny_pipeline_dir("pixart"))
    capsys.readouterr()
    code = main(["run", W8, "--model", src, "--out", str(out), *_sets()])
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the loading progress bars
    assert code == 2
    assert err.startswith("error: ") and "mount point" in err and str(out / "compressed") in err
    assert out.is_dir() and not any(out.iterdir())
    assert not list(tmp_path.glob(".mnt*"))


def test_out_of_another_user_in_a_sticky_folder_refused(tmp_path, monkeypatch):
    # in a sticky folder (like /tmp) only its owner may rename an entry, so it cannot be replaced
    import os

    from compress.errors import UserError
    from compress.io.save import check_out_dir

    sticky = tmp_path / "shared"
    (sticky / "o").mkdir(parents=True)
    sticky.chmod(0o1777)
    monkeypatch.setattr(os, "geteuid", lambda: os.stat(sticky).st_uid + 12345)
    with pytest.raises(UserError, match="another user in the sticky folder"):
        check_out_dir(sticky / "o", False, None)
    check_out_dir(sticky / "new", False, None)  # a new folder in it is fine


def test_cli_missing_model_and_inspect(tiny_pipeline_dir, tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nope")]) == 2
    assert main(["inspect", str(tiny_pipeline_dir("flux"))]) == 0
    text = capsys.readouterr().out
    assert "single_transformer_blocks" in text


@pytest.mark.parametrize(
    "recipe,extra",
    [
        ("w8a8.yaml", []),
        ("w8a8.yaml", ["passes.0.ptq.activations.mode=static",
                       "passes.0.ptq.activations.timestep_groups=2"]),
        ("w4a8-mp.yaml", ["passes.0.ptq.mixed_precision.image_steps=2"]),
        ("w4a4-lowrank.yaml", ["passes.0.ptq.lowrank.rank=4"]),
        ("w4-gptq.yaml", []),
    ],
)
def test_ptq_recipes_reload_bit_equal(recipe, extra, tiny_pipeline_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("DIT_COMPRESS_CACHE", str(tmp_path / "cache"))
    import compress
    from compress.models import load_model

    src = tiny_pipeline_dir("pixart")
    out = tmp_path / "out"
    report = compress.run_recipe(str(ROOT / "recipes" / recipe), model=str(src), out=out,
                                 overrides=TINY + ["gates={}", "passes.0.ptq.calib_samples=4",
                                                   *extra])
    p = report["passes"][0]
    assert p["layers_quantized"] > 0
    # every quantised layer ran in the forward pass
    assert p["weights_quantized_and_used_fraction"] == pytest.approx(
        p["weights_quantized_fraction"])
    assert report["quality"]["psnr_vs_teacher"] is None or report["quality"]["psnr_vs_teacher"] > 20
    pipe = compress.load_pipeline(out)
    ev = report["eval"]
    images = load_model(str(src)).adapter.generate(pipe, ev["prompts"], ev["seeds"], ev["steps"],
                                                   ev["guidance"], ev["resolution"])
    assert np.array_equal(images, report["_student_images"])
