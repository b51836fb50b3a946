"""Optional peer libraries stay quiet: loading an output prints nothing about bitsandbytes.

diffusers imports bitsandbytes whenever it is installed (diffusers.models.modeling_utils ->
diffusers.quantizers), and bitsandbytes' import then logs, on CPUs with AVX512-BF16, that it
cannot fetch its optional CPU kernel offline; compress drops exactly those lines."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import compress

ROOT = Path(__file__).resolve().parents[1]
TINY = ["calibration.num_prompts=1", "calibration.steps=2", "eval.enabled=false",
        "eval.latency=false"]


def test_load_pipeline_prints_nothing_about_bitsandbytes(tiny_pipeline_dir, tmp_path):
    out = tmp_path / "o"
    compress.run_recipe(ROOT / "recipes" / "w8.yaml", model=str(tiny_pipeline_dir("pixart")),
                        out=out, overrides=TINY, cache_dir=tmp_path / "cache")
    code = (f"import compress, sys; compress.load_pipeline({str(out)!r}); "
            "print(sorted(m for m in sys.modules if m.startswith('optimum')))")
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True,
                       text=True, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "[]"  # optimum-quanto: only export-quanto uses it
    for word in ("bitsandbytes", "gemm_4bit", "kernels-community"):
        assert word not in r.stderr, r.stderr[-2000:]
