"""The shipped ShapeDiT as a user would drive it: weights, calibration, sampler and judge.

``--model demo-dit`` (CLI) and ``compress.run_recipe(recipe, model="demo-dit")`` run exactly
``run_recipe(recipe, model=load_shapedit(), calibrate_fn=calibrate, sample_fn=sample_fn,
metric_fn=metric_fn)``: the own-module path, with nothing special for this model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from compress.demo.shapedit import ShapeDiT, sample_seeds
from compress.errors import UserError

WEIGHTS_DIR = Path(__file__).resolve().parent / "shapedit"
CALIB_SEED = 2_000_000  # calibration seeds start here, far from evaluation seeds (1000 + i)


def load_shapedit(dtype: torch.dtype = torch.float32) -> ShapeDiT:
    """The trained ShapeDiT (eval/train_shapedit.py), upcast from its stored fp16."""
    from safetensors.torch import load_file

    cfg_path, w_path = WEIGHTS_DIR / "config.json", WEIGHTS_DIR / "model.safetensors"
    if not w_path.is_file():
        raise UserError(f"{w_path}: missing; train it with eval/train_shapedit.py and --export")
    info = json.loads(cfg_path.read_text())
    model = ShapeDiT(**info["config"])
    model.load_state_dict({k: v.to(dtype) for k, v in load_file(str(w_path)).items()})
    return model.to(dtype).eval()


def calibrate(module, n: int = 8) -> None:
    """Run the sampler on ``n`` calibration seeds (their classes follow from the seeds), 8 seeds
    a run, so that a large ``n`` (distillation asks for more) gives many calls of 16 rows rather
    than a few huge ones."""
    seeds = [CALIB_SEED + i for i in range(n)]
    for i in range(0, n, 8):
        sample_seeds(module, seeds[i:i + 8])


def sample_fn(module, seeds):
    """Images [N, 3, 32, 32] in [0, 1] and the caption of each image's class."""
    return sample_seeds(module, seeds)


def metric_fn(images, captions) -> float:
    """Share of images whose every attribute the demo checker confirms."""
    from compress.metrics.checker import accuracy

    arr = np.rint(np.clip(np.asarray(images), 0, 1) * 255).astype(np.uint8)
    return float(accuracy(list(arr), list(captions))["all"])
