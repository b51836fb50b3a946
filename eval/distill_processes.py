"""One process against two: the same distillation recipe run by `dit-compress run` alone and
under `torchrun --nproc_per_node 2` (gloo on the CPU), then the trained transformers compared.

    python eval/distill_processes.py                       # depth-50-kd on the demo, 40 steps
    python eval/distill_processes.py --recipe recipes/depth-25-kd.yaml --steps 100

Both runs see the same global batches (each process takes its half of every batch and the
gradients are summed before each step), so they train the same model up to floating-point
order. Printed: wall seconds of each run, the size of the update (squared norm of trained minus
original weights) and the squared norm of the difference between the two results, relative to
the update. The CPU model is printed too: every figure belongs to the machine it ran on.
Evaluation is switched off so that only the training is timed; the cache is shared, so the
calibration and distillation data are captured once.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _weights(out: Path) -> dict:
    from safetensors.torch import load_file

    sd = {}
    for f in sorted((out / "transformer").glob("*.safetensors")):
        sd.update(load_file(str(f)))
    return sd


def _run(cmd: list[str], env: dict) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=ROOT)
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="recipes/depth-50-kd.yaml")
    ap.add_argument("--model", default="demo")
    ap.add_argument("--steps", type=int, default=40, help="distillation steps in both runs")
    ap.add_argument("--work", type=Path, default=None, help="outputs (default: a temp dir)")
    ap.add_argument("--cache-dir", default=None, help="shared cache (default: the usual one)")
    a = ap.parse_args()

    import compress

    names = [next(iter(p)) for p in compress.load_recipe(a.recipe).resolved()["passes"]]
    if "distill" not in names:
        print(f"{a.recipe} has no distill pass", file=sys.stderr)
        return 2
    i = names.index("distill")
    work = a.work or Path(tempfile.mkdtemp(prefix="distill-proc-"))
    sets = ["--set", f"passes.{i}.distill.steps={a.steps}", "--set",
            f"passes.{i}.distill.warmup={min(10, a.steps // 4)}", "--set", "eval.enabled=false",
            "--set", "eval.latency=false", "--set", f"passes.{i}.distill.checkpoint_every=0"]
    if a.cache_dir:
        sets += ["--cache-dir", a.cache_dir]
    base = ["-m", "compress.cli", "run", a.recipe, "--model", a.model, "--force", *sets]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two processes on two cores: one thread each
    # the one-process run also captures the data both runs share, so time a second identical
    # run to compare like with like
    _run([sys.executable, *base, "--out", str(work / "warm")], env)
    t1 = _run([sys.executable, *base, "--out", str(work / "one")], env)
    t2 = _run([sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", *base, "--out", str(work / "two")], env)
    one, two = _weights(work / "one"), _weights(work / "two")
    import json

    from compress.models import adapter_for, depth, load_model

    # the update is measured from the weights distillation started from: the original with the
    # same blocks removed (the report names them in the original numbering)
    handle = load_model(a.model)
    tr = handle.transformer
    rep = json.loads((work / "one" / "report.json").read_text())
    removed = [b for p in rep["passes"] for b in p.get("removed", [])]
    if removed:
        depth.remove_blocks(tr, adapter_for(tr, allow_generic=True), removed)
    src = tr.state_dict()
    same = [k for k in one if k in src and src[k].shape == one[k].shape]
    moved = sum(float((one[k].float() - src[k].float()).pow(2).sum()) for k in same)
    diff = sum(float((one[k].float() - two[k].float()).pow(2).sum()) for k in one)
    from compress.metrics.timing import cpu_model

    print(f"CPU: {cpu_model()}")
    print(f"{a.recipe} on {a.model}, {a.steps} distillation steps")
    print(f"1 process: {t1:.1f} s   2 processes (torchrun, gloo): {t2:.1f} s   "
          f"(whole runs: data cached, no evaluation)")
    print(f"update |w_1 - w_start|^2 = {moved:.4g} (over {len(same)} of {len(one)} tensors)")
    print(f"difference |w_1 - w_2|^2 = {diff:.4g}  ({diff / max(moved, 1e-30):.3g} of the update)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
