"""One run per --out: a second is refused at once naming the first's PID; what killed runs
left beside --out is removed by the next run and listed/removed by `dit-compress clean`."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

import compress
from compress.cli import main as cli
from compress.errors import UserError
from compress.io.lock import OutLock, held


def _recipe():
    return {"name": "w8", "passes": [{"ptq": {"include": ["re:.*"]}}],
            "eval": {"enabled": False, "latency": False}}


def _run(out, calls=None):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8))

    def calibrate(m):
        if calls is not None:
            calls.append(1)
        m(torch.randn(2, 8))

    return compress.run_recipe(_recipe(), model=net, out=out, calibrate_fn=calibrate)


def test_second_run_to_the_same_out_is_refused_before_any_work(tmp_path):
    out = tmp_path / "o"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from compress.io.lock import OutLock\n"
        f"with OutLock(Path({str(out)!r})):\n    print('locked', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        calls: list = []
        with pytest.raises(UserError, match=f"another run \\(PID {holder.pid}\\)"):
            _run(out, calls)
        assert not calls and not out.exists()
        assert held(out)
    finally:
        holder.kill()
        holder.wait()
    assert not held(out)  # a killed holder releases the lock with its process
    _run(out)
    assert (out / "compress_manifest.json").is_file()


def test_leftovers_of_a_killed_run_are_removed(tmp_path, capsys):
    out = tmp_path / "o"
    junk = [tmp_path / ".o.tmp-abc123", tmp_path / ".o.old-999"]
    for j in junk:
        (j / "transformer").mkdir(parents=True)
    cache = tmp_path / "cache"
    old_tmp = cache / "calib" / ".tmp-0123456789ab-x"
    old_tmp.mkdir(parents=True)
    fresh_tmp = cache / "calib" / ".tmp-fresh-y"
    fresh_tmp.mkdir(parents=True)
    past = time.time() - 7200
    os.utime(old_tmp, (past, past))
    assert cli(["clean", str(out), "--cache-dir", str(cache), "--dry-run"]) == 0
    listed = capsys.readouterr().out
    assert all(str(j) in listed for j in junk) and str(old_tmp) in listed
    assert str(fresh_tmp) not in listed and all(j.exists() for j in junk)
    assert cli(["clean", str(out), "--cache-dir", str(cache)]) == 0
    assert not any(j.exists() for j in junk) and not old_tmp.exists() and fresh_tmp.exists()
    (junk[0]).mkdir()
    with OutLock(out):  # taking the lock clears what an earlier killed run left
        assert not junk[0].exists()
