"""Peer tools (eval/peers.py) on the tiny PixArt pipeline: every peer runs through the real
pipeline and writes a valid schema-1 report, quanto W8A8 stays close to the original, and bits
per weight order the schemes as their formats say."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from compress.errors import UserError
from compress.report import validate_report

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval"))

import peers

REQUIRED = ("quanto-w8a8", "quanto-w4a8", "quanto-w4", "quanto-w2", "bnb-nf4", "bnb-int8", "bf16")


def _quanto_unpack_unavailable() -> str | None:
    """Why quanto cannot run qint4 / qint2 on CPU here, or None when it can."""
    try:
        from optimum.quanto.library.extensions import cpp
    except ImportError as exc:
        return f"optimum-quanto's CPU extension cannot be imported ({exc})"
    built = Path(cpp.__file__).parent / "build" / "pytorch_version.txt"
    if built.is_file() or shutil.which(os.environ.get("CXX", "c++")):
        return None
    return "quanto unpacks qint4/qint2 with a C++ extension built on first use: no C++ compiler"


@pytest.fixture(scope="module")
def peer_report(
    tiny_pipeline_dir: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str], dict[str, Any]]:
    """Factory: run a peer once on the tiny PixArt pipeline and return its report.json."""
    src = tiny_pipeline_dir("pixart")
    work = tmp_path_factory.mktemp("peers")
    done: dict[str, dict[str, Any]] = {}

    def get(name: str) -> dict[str, Any]:
        if name.startswith("quanto-w4") or name == "quanto-w2":
            reason = _quanto_unpack_unavailable()
            if reason:
                pytest.skip(reason)
        if name.startswith("tp-") and importlib.util.find_spec("torch_pruning") is None:
            pytest.skip("torch-pruning is not installed (pip install torch-pruning==1.6.1)")
        for prefix, mod in (("torchao-", "torchao"), ("modelopt-", "modelopt")):
            if name.startswith(prefix) and importlib.util.find_spec(mod) is None:
                pytest.skip(f"{mod} is not installed (pip install -e .[peers])")
        if name not in done:
            # one calibration prompt, one evaluation prompt; caches shared by every peer
            out = peers.run_peer(name, str(src), work / name, 1, calib_prompts=1,
                                 cache_dir=work / "cache")
            assert out == work / name
            done[name] = json.loads((out / "report.json").read_text())
        return done[name]

    return get


def test_peer_list() -> None:
    assert set(REQUIRED) <= set(peers.PEERS)
    assert all(isinstance(d, str) and d for d in peers.PEERS.values())


@pytest.mark.parametrize("name", list(peers.PEERS))
def test_peer_runs_and_reports(name: str, peer_report: Callable[[str], dict[str, Any]]) -> None:
    rep = peer_report(name)
    validate_report(rep)
    assert rep["schema"] == 1
    assert rep["recipe"]["name"] == f"peer:{name}"
    assert rep["recipe"]["description"] == peers.PEERS[name]
    assert [p["name"] for p in rep["passes"]] == [f"peer:{name}"]
    assert rep["passes"][0]["seconds"] >= 0
    assert rep["model"]["family"] == "pixart"
    size, speed, quality = rep["size"], rep["speed"], rep["quality"]
    assert 0 < size["bytes"] < rep["model"]["original_bytes"]
    assert size["bits_per_weight"] == pytest.approx(
        size["bytes"] * 8 / (rep["model"]["params"] + rep["model"]["buffer_elements"]))
    assert speed["latency_ms_per_step"] > 0 and speed["baseline_latency_ms_per_step"] > 0
    # images came out of the pipeline and were scored against the teacher's
    assert quality["n_images"] == 1
    assert quality["psnr_vs_teacher"] is not None or quality["identical_to_teacher"]
    assert rep["eval"]["seeds"] == [1000]
    if name.startswith("tp-"):  # a pruning peer: fewer weights, the share it was asked for
        assert size["params_total"] < rep["model"]["params"]
        assert rep["passes"][0]["block_sparsity"] == pytest.approx(
            int(name.rsplit("-", 1)[1]) / 100, abs=0.08)
        assert max(rep["passes"][0]["heads_kept"]) < 2  # heads went too (the tiny model has 2)
    elif not name.endswith("-full"):
        assert rep["passes"][0]["layers_quantized"] > 0
        assert 0 < rep["passes"][0]["weights_quantized_fraction"] < 1


def test_quanto_w8a8_close_to_teacher(peer_report: Callable[[str], dict[str, Any]]) -> None:
    rep = peer_report("quanto-w8a8")
    assert rep["passes"][0]["calibration_calls"] > 0
    assert rep["quality"]["identical_to_teacher"] or rep["quality"]["psnr_vs_teacher"] > 20


def test_bits_per_weight_monotone(peer_report: Callable[[str], dict[str, Any]]) -> None:
    bpw = {n: peer_report(n)["size"]["bits_per_weight"] for n in ("quanto-w4", "quanto-w8a8",
                                                                  "bf16")}
    rep = peer_report("bf16")
    fp32 = rep["model"]["original_bytes"] * 8 / rep["model"]["params"]
    assert fp32 == pytest.approx(32)
    assert bpw["quanto-w4"] < bpw["quanto-w8a8"] < bpw["bf16"] < fp32
    assert peer_report("bf16-full")["size"]["bits_per_weight"] == pytest.approx(16, abs=0.1)


def test_unknown_peer_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="unknown peer"):
        peers.run_peer("quanto-w3", "demo", tmp_path, 1)


def test_gguf_peers_hold_gguf_blocks(peer_report: Callable[[str], dict[str, Any]]) -> None:
    """Q8_0 stores 8.5 bits per quantised weight and Q4_0 4.5: fewer bytes, lower PSNR."""
    q8, q4 = peer_report("gguf-q8_0"), peer_report("gguf-q4_0")
    assert q4["size"]["bytes"] < q8["size"]["bytes"] < q8["model"]["original_bytes"]
    assert q8["quality"]["identical_to_teacher"] or \
        q8["quality"]["psnr_vs_teacher"] > q4["quality"]["psnr_vs_teacher"]
