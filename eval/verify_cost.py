"""Cost of output verification: SHA-256 throughput per GB on this machine, and load_pipeline
(or load_module) time with and without verify=True on an output.

    python eval/verify_cost.py runs/quality/w8            # an output folder
    python eval/verify_cost.py --gb 1                      # hashing speed on a 1 GB temp file
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("output", nargs="?", help="a dit-compress pipeline output to load")
    ap.add_argument("--gb", type=float, default=1.0, help="size of the hashing test file")
    ap.add_argument("--repeats", type=int, default=3, help="best of this many loads")
    a = ap.parse_args()
    from compress.io.integrity import sha256
    from compress.metrics.timing import cpu_model

    print(f"CPU: {cpu_model()}")
    with tempfile.NamedTemporaryFile(dir=".", delete=True) as f:
        block = os.urandom(1 << 20)
        for _ in range(int(a.gb * 1024)):
            f.write(block)
        f.flush()
        sha256(Path(f.name))  # warm the page cache: the figure is the hash, not the disk
        t0 = time.perf_counter()
        sha256(Path(f.name))
        secs = time.perf_counter() - t0
    print(f"SHA-256: {secs / a.gb:.2f} s per GB ({a.gb / secs:.2f} GB/s, page cache warm)")
    if a.output:
        import compress

        times = {}
        for verify in (False, True, False, True):
            best = float("inf")
            for _ in range(a.repeats):
                t0 = time.perf_counter()
                compress.load_pipeline(a.output, verify=verify)
                best = min(best, time.perf_counter() - t0)
            times[verify] = min(best, times.get(verify, float("inf")))
        size = sum(p.stat().st_size for p in Path(a.output).rglob("*") if p.is_file())
        extra = times[True] - times[False]
        print(f"load_pipeline {a.output} ({size / 1e6:.1f} MB): {times[False]:.3f} s, "
              f"with verify=True {times[True]:.3f} s (+{100 * extra / times[False]:.1f}%)")
        from compress.io.integrity import check
        from compress.io.manifest import read_manifest

        tdir = Path(a.output) / "transformer"
        tdir = tdir if tdir.is_dir() else Path(a.output)
        best = float("inf")
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            check(tdir, read_manifest(tdir))
            best = min(best, time.perf_counter() - t0)
        print(f"of which the default check (sizes, heads, manifest seal): {best:.3f} s "
              f"({100 * best / times[False]:.1f}% of the load)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
