"""Per-layer sensitivity for mixed precision, by two metrics:

- output: the layer's own relative output error at each candidate bit width, on its captured
  calibration inputs (cheap, every layer);
- image: PSNR of the pipeline's decoded images with only that layer quantised, against the
  unquantised pipeline's, on a few calibration prompts (what users see; one pipeline run per
  layer and candidate, so it is capped by ``image_layers``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from compress.quant.mixed import FLOAT_BITS, output_sensitivity
from compress.quant.smooth import fake_quant_weight


@dataclass(frozen=True)
class Choice:
    """How one layer may be quantised: candidate weight bits (16: kept in full precision), the
    weight grid, the activation bits it will run with (None: float), and a conv's groups."""

    candidates: tuple[int, ...]
    group_size: int | None = None
    symmetric: bool = True
    a_bits: int | None = None
    conv_groups: int = 1


def output_tables(weights: Mapping[str, torch.Tensor], inputs: Mapping[str, torch.Tensor],
                  choices: Mapping[str, Choice]) -> dict[str, dict[int, float]]:
    """{layer: {bits: relative output MSE}}; weights [out, fan_in] (convs flattened), inputs
    their rows (convs: unfolded patches)."""
    out = {}
    for n, w in weights.items():
        c = choices[n]
        sens = output_sensitivity(w, inputs[n], c.candidates, c.group_size, c.symmetric, c.a_bits,
                                  groups=c.conv_groups)
        out[n] = {b: v["rel_mse"] for b, v in sens.items()}
    return out


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 100.0 if mse == 0 else float(10 * np.log10(1.0 / mse))


@torch.no_grad()
def image_tables(handle, modules: Mapping[str, torch.nn.Module], choices: Mapping[str, Choice],
                 prompts: list[str], seeds: list[int], steps: int,
                 guidance, resolution) -> dict[str, dict[int, float]]:
    """{layer: {bits: image error}}: 10^(-PSNR/10) of images with only that layer's weight
    quantised (Linear or Conv2d), 0 for the full-precision option."""
    gen = handle.adapter.generate
    ref = gen(handle.pipeline, prompts, seeds, steps, guidance, resolution)
    out: dict[str, dict[int, float]] = {}
    for n, mod in tqdm(modules.items(), desc="image sensitivity", leave=False):
        w0 = mod.weight.data
        c = choices[n]
        out[n] = {}
        for b in c.candidates:
            if b >= FLOAT_BITS:
                out[n][b] = 0.0
                continue
            wq = fake_quant_weight(w0.flatten(1), b, c.group_size, c.symmetric)
            mod.weight.data = wq.reshape(w0.shape).to(w0.dtype)
            try:
                img = gen(handle.pipeline, prompts, seeds, steps, guidance, resolution)
            finally:
                mod.weight.data = w0
            out[n][b] = 10.0 ** (-_psnr(ref, img) / 10.0)
    return out
