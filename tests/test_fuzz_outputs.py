"""Fuzz: damaged copies of a real output (a tiny PixArt pipeline through w8), seeded.

Every damage (flipped bytes in headers and bodies, truncation, deleted files, manifests edited
with and without a fresh seal, edited model_index/config/shard index, paths outside, symlinks
out and loops) must be refused by ``load_pipeline`` with one UserError line, or load exactly
the weights that were written. Every file of this output is under 1 MiB, so every load hashes
it whole (see compress/io/integrity.py): a flipped byte anywhere is found without verify=True.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
from collections import Counter
from pathlib import Path

import pytest
import torch

import compress
from compress.errors import UserError
from compress.io.manifest import seal

CASES = 220
SECONDS = 30
TINY = ["calibration.num_prompts=1", "calibration.steps=2", "eval.enabled=false",
        "eval.latency=false", "gates={}"]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def written(tiny_pipeline_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("fuzz_out")
    os.environ.setdefault("DIT_COMPRESS_CACHE", str(base / "cache"))
    out = base / "out"
    compress.run_recipe(str(ROOT / "recipes" / "w8.yaml"), model=str(tiny_pipeline_dir("pixart")),
                        out=out, overrides=TINY)
    state = {k: v.clone() for k, v in compress.load_pipeline(out).transformer.state_dict().items()}
    return out, state


def _files(out: Path) -> list[Path]:
    people = {"report.json", "report.md", "report.html", "recipe.yaml"}
    return sorted(p for p in out.rglob("*") if p.is_file() and p.name not in people)


def _json_edit(rng, p: Path) -> None:
    d = json.loads(p.read_text())
    key = rng.choice(sorted(d)) if isinstance(d, dict) and d else None
    choice = rng.randrange(5)
    if choice == 0 and key:
        del d[key]
    elif choice == 1 and key:
        d[key] = rng.choice([None, 7, "x", [], {}, -1, 1e308, "../../etc/passwd"])
    elif choice == 2:
        d = rng.choice([[], "s", 3, None])
    elif choice == 3:
        p.write_text("{" * 5000)
        return
    else:
        p.write_bytes(b"\xff\xfe" + os.urandom(16))
        return
    p.write_text(json.dumps(d))


def _manifest_edit(rng, p: Path, reseal: bool) -> str:
    m = json.loads(p.read_text())
    layers = m["passes"][0]["meta"]["layers"]
    name = rng.choice(sorted(layers))
    choice = rng.randrange(8)
    if choice == 0:
        layers[name]["bits"] = rng.choice([2, 3, 4, 6, 16, "8", None])
    elif choice == 1:
        layers[name][rng.choice(["in", "out"])] += rng.choice([-1, 1, 8])
    elif choice == 2:
        layers[f"{name}.zz"] = dict(layers[name])
    elif choice == 3:
        del layers[name]
    elif choice == 4:
        m[rng.choice(["transformer_class", "family", "transformer_module"])] = rng.choice(
            ["os", "Nope", "flux", "", "builtins"])
    elif choice == 5:
        rel = rng.choice(sorted(m["files"]))
        m["files"][rel]["size"] += rng.choice([-1, 1])
    elif choice == 6:
        m["files"][rng.choice(["../x", "/etc/passwd", "a/../../b"])] = {
            "size": 1, "sha256": "0" * 64, "head": [1, "0" * 64]}
    else:
        m["passes"][0]["name"] = rng.choice(["vq", "frobnicate", ""])
    p.write_text(json.dumps(seal(m) if reseal else m))
    return f"edit {choice} of {name}"


def damage(rng: random.Random, out: Path, outside: Path) -> str:
    files = _files(out)
    kind = rng.choice(["flip_head", "flip_body", "truncate", "delete", "manifest",
                       "manifest_resealed", "json", "shard_index", "symlink_out", "loop"])
    p = rng.choice(files)
    if kind in ("flip_head", "flip_body"):
        st = [f for f in files if f.suffix == ".safetensors"]
        p = rng.choice(st) if kind == "flip_head" else p
        data = bytearray(p.read_bytes())
        if kind == "flip_head":
            at = rng.randrange(8 + int.from_bytes(data[:8], "little"))
        else:
            at = rng.randrange(len(data))
        data[at] ^= 1 << rng.randrange(8)
        p.write_bytes(bytes(data))
    elif kind == "truncate":
        p.write_bytes(p.read_bytes()[: rng.randrange(max(1, p.stat().st_size))])
    elif kind == "delete":
        p.unlink()
    elif kind in ("manifest", "manifest_resealed"):
        p = out / "transformer" / "compress_manifest.json"
        return f"{kind} " + _manifest_edit(rng, p, reseal=kind == "manifest_resealed")
    elif kind == "json":
        _json_edit(rng, rng.choice([f for f in files if f.suffix == ".json"
                                    and f.name != "compress_manifest.json"]))
    elif kind == "shard_index":
        target = rng.choice(["../../../../etc/passwd", str(outside), "../vae/x.safetensors"])
        (out / "transformer" / "diffusion_pytorch_model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": {"a": target}}))
        (out / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    elif kind == "symlink_out":
        shutil.copy(p, outside)
        p.unlink()
        os.symlink(outside, p)
    else:
        os.symlink("..", rng.choice([out / "vae", out / "transformer", out]) / "loop")
    return f"{kind} {p.relative_to(out)}"


class _Hang(Exception):
    pass


def _alarm(signum, frame):
    raise _Hang


def test_damaged_outputs_refused_in_one_line_or_loaded_exactly(written, tmp_path):
    out, state = written
    rng = random.Random(7)
    outcome: Counter = Counter()
    old = signal.signal(signal.SIGALRM, _alarm)
    try:
        for i in range(CASES):
            case_dir = tmp_path / f"c{i}" / "out"
            shutil.copytree(out, case_dir, symlinks=True)
            what = damage(rng, case_dir, tmp_path / f"c{i}" / "outside.bin")
            signal.alarm(SECONDS)
            try:
                pipe = compress.load_pipeline(case_dir)
            except UserError as exc:
                msg = str(exc)
                assert msg and "\n" not in msg and len(msg) < 2000, (what, msg)
                outcome[what.split()[0], "refused"] += 1
                continue
            except _Hang:
                pytest.fail(f"hang: {what}")
            finally:
                signal.alarm(0)
            got = pipe.transformer.state_dict()  # loaded: it must be exactly what was written
            assert got.keys() == state.keys(), what
            assert all(torch.equal(got[k], state[k]) for k in state), f"silent wrong load: {what}"
            outcome[what.split()[0], "loaded exactly"] += 1
            shutil.rmtree(case_dir.parent)
    finally:
        signal.signal(signal.SIGALRM, old)
    assert sum(outcome.values()) == CASES
    assert len({k for k, _ in outcome}) == 10, outcome
    print(dict(sorted(outcome.items())))
