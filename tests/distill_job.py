"""A small prune-and-distill run on a saved tiny pipeline, for the tests that start it as a
separate process (under torchrun, or killed mid-run and resumed).

    python tests/distill_job.py MODEL_DIR OUT CACHE [--resume] [--steps N] [--batch B]
        [--prune last|learnable|width]

--prune: the first pass: the last block removed (default), a learned block choice
(TinyFusion-style), or learned width gates on whole trajectories (EcoDiff-style).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

torch.set_num_threads(1)


PRUNE = {
    "last": {"prune_depth": {"method": "last", "remove": 1}},
    "learnable": {"prune_depth": {"method": "learnable", "remove": 1, "calib_samples": 4,
                                  "learnable": {"steps": 6, "batch": 2, "lora_rank": 2,
                                                "checkpoint_every": 0}}},
    "width": {"prune_width": {"method": "learnable", "sparsity": 0.25,
                              "learnable": {"steps": 4, "batch": 2, "checkpoint_every": 0,
                                            "data": {"num_prompts": 4}}}},
}


def recipe(steps: int, batch: int, every: int, prune: str = "last") -> dict:
    return {
        "name": "distill-job",
        "calibration": {"num_prompts": 2, "steps": 3},
        "passes": [
            PRUNE[prune],
            {"distill": {"steps": steps, "batch": batch, "lr": 0.001, "warmup": 2,
                         "checkpoint_every": every,
                         "data": {"num_prompts": 2, "seeds_per_prompt": 2}}},
        ],
        "eval": {"enabled": False, "latency": False},
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("cache")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--every", type=int, default=4)
    ap.add_argument("--prune", choices=sorted(PRUNE), default="last")
    a = ap.parse_args()
    import compress

    compress.run_recipe(recipe(a.steps, a.batch, a.every, a.prune), a.model, a.out, cache_dir=a.cache,
                        resume=a.resume, force=True)


if __name__ == "__main__":
    main()
