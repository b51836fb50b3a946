"""Time to refusal: each bad input of issue 11, replayed through `dit-compress run` on the demo.

For every case: the exit code (2 expected), the number of stderr lines that are not progress
bars or library warnings (1 expected: the tool's own `error:` line), the wall time from start
to exit (a fresh process: imports included), and whether anything was written (the --out
folder or a temporary folder beside it).

    python eval/refusal_times.py            # all cases, a table on stdout
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
W8, MP = str(ROOT / "recipes" / "w8.yaml"), str(ROOT / "recipes" / "w4a8-mp.yaml")
PTQ = "passes.0.ptq"
SETS = {  # name: (recipe, --set values)
    "empty passes": (W8, ["passes=[]"]),
    "passes= (nothing)": (W8, ["passes="]),
    "pass null": (W8, ["passes.0=null"]),
    "pass a bare string": (W8, ["passes.0=ptq"]),
    "guidance NaN": (W8, ["calibration.guidance=.nan"]),
    "guidance inf": (W8, ["calibration.guidance=.inf"]),
    "guidance negative": (W8, ["calibration.guidance=-1"]),
    "alpha -5": (MP, [f"{PTQ}.smoothing.alpha=-5"]),
    "alpha 7": (MP, [f"{PTQ}.smoothing.alpha=7"]),
    "alpha NaN": (MP, [f"{PTQ}.smoothing.alpha=.nan"]),
    "gptq.damp inf": (MP, [f"{PTQ}.gptq.damp=.inf"]),
    "avg_bits inf": (MP, [f"{PTQ}.mixed_precision.avg_bits=.inf"]),
    "avg_bits 100": (MP, [f"{PTQ}.mixed_precision.avg_bits=100"]),
    "avg_bits below candidates": (MP, [f"{PTQ}.mixed_precision.avg_bits=3"]),
    "budget unreachable for these shapes": (MP, [f"{PTQ}.mixed_precision.avg_bits=4.01",
                                                 f"{PTQ}.mixed_precision.if_unreachable=refuse"]),
    "candidates []": (MP, [f"{PTQ}.mixed_precision.candidates=[]"]),
    "metrics []": (MP, [f"{PTQ}.mixed_precision.metrics=[]"]),
    "capture_steps [-1]": (W8, ["calibration.capture_steps=[-1]"]),
    "capture_steps [999]": (W8, ["calibration.capture_steps=[999]"]),
    "capture_steps []": (W8, ["calibration.capture_steps=[]"]),
    "capture_steps duplicates": (W8, ["calibration.capture_steps=[1,1]"]),
    "include []": (W8, [f"{PTQ}.include=[]"]),
    "name ''": (W8, ["name=''"]),
    "resolution 9": (W8, ["calibration.resolution=9"]),
    "steps 10^6": (W8, ["calibration.steps=1000000"]),
    "latency repeats 10^9": (W8, ["eval.latency_repeats=1000000000"]),
    "group size 10^12": (W8, [f"{PTQ}.weights.granularity=group",
                              f"{PTQ}.weights.group_size=1000000000000"]),
    "calib samples 10^9": (W8, [f"{PTQ}.calib_samples=1000000000"]),
    "rank 10^6": (str(ROOT / "recipes" / "w4a4-lowrank.yaml"), [f"{PTQ}.lowrank.rank=1000000"]),
    "num_prompts true": (W8, ["calibration.num_prompts=true"]),
    "bits 8.0": (W8, [f"{PTQ}.weights.bits=8.0"]),
    "gate threshold NaN": (W8, ["gates.psnr_vs_teacher='>= .nan'"]),
    "gate naming no figure": (W8, ["gates.speed_of_light='>= 1'"]),
    "misspelt selector attn_qvk": (W8, [f"{PTQ}.include=[attn_qvk]"]),
    "invalid regex": (W8, [f"{PTQ}.include=['re:(']"]),
    "seed 2**64": (W8, [f"calibration.seed={2**64}"]),
    "--set key=[": (W8, ["name=["]),
    "--set unquoted >= 30": (W8, ["gates.psnr_vs_teacher=>= 30"]),
    "prompt file /dev/zero": (W8, ["calibration.prompts=/dev/zero"]),
}


def _files() -> dict[str, bytes]:
    deep = "name: x\npasses: " + "[" * 400 + "]" * 400 + "\n"
    return {"duplicate keys": b"name: a\nname: b\npasses: [{ptq: {}}]\n",
            "binary recipe": os.urandom(64) + b"\0",
            "non-UTF-8 recipe": "name: caf\u00e9\npasses: [{ptq: {}}]\n".encode("latin-1"),
            "nested 400 levels": deep.encode()}


def _own_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith(("error:", "internal error:",
                                                               "Traceback"))]


def run(name: str, recipe: str, sets: list[str], out: Path, extra=()) -> tuple:
    cmd = ["dit-compress", "run", recipe, "--model", "demo", "--out", str(out), *extra]
    for s in sets:
        cmd += ["--set", s]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    secs = time.perf_counter() - t0
    written = out.exists() or any(q.name.startswith(f".{out.name}") for q in out.parent.iterdir())
    own = _own_lines(p.stderr)
    return name, p.returncode, len(own), secs, written, (own[0] if own else p.stderr[-200:])


def main() -> int:
    from compress.metrics.timing import cpu_model

    print(f"CPU: {cpu_model()}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        for i, (name, (recipe, sets)) in enumerate(SETS.items()):
            rows.append(run(name, recipe, sets, base / f"o{i}"))
        for i, (name, data) in enumerate(_files().items()):
            f = base / f"r{i}.yaml"
            f.write_bytes(data)
            rows.append(run(name, str(f), [], base / f"f{i}"))
        ro = base / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        if os.geteuid() != 0:  # root writes anywhere: a read-only folder refuses nobody
            rows.append(run("read-only --out parent", W8, [], ro / "out"))
    bad = 0
    print(f"{'case':40} exit lines  secs written  message")
    for name, rc, lines, secs, written, msg in rows:
        ok = rc == 2 and lines == 1 and secs < 10 and not written
        bad += not ok
        print(f"{name:40} {rc:4} {lines:5} {secs:5.1f} {written!s:7}  {msg[:110]}"
              + ("" if ok else "   <-- NOT OK"))
    secs = sorted(r[3] for r in rows)
    print(f"{len(rows)} cases, {bad} not refused cleanly; time to refusal median "
          f"{secs[len(secs) // 2]:.1f} s, max {secs[-1]:.1f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
