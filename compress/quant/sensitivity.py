"""Per-layer sensitivity for mixed precision, by two metrics:

- output: the layer's own relative output error at each candidate bit width, on its captured
  calibration inputs (cheap, every layer);
- image: PSNR of the pipeline's decoded images with only that layer quantised, against the
  unquantised pipeline's, on a few calibration prompts (what users see; one pipeline run per
  layer and candidate, so it is capped by ``image_layers``).
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from compress.quant.mixed import output_sensitivity
from compress.quant.smooth import fake_quant_weight


def output_tables(weights: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor],
                  candidates: list[int], group_size: int | None, a_bits: int | None
                  ) -> dict[str, dict[int, float]]:
    out = {}
    for n, w in weights.items():
        sens = output_sensitivity(w, inputs[n], candidates, group_size, True, a_bits)
        out[n] = {b: v["rel_mse"] for b, v in sens.items()}
    return out


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 100.0 if mse == 0 else float(10 * np.log10(1.0 / mse))


@torch.no_grad()
def image_tables(handle, modules: dict[str, torch.nn.Module], candidates: list[int],
                 group_size: int | None, prompts: list[str], seeds: list[int], steps: int,
                 guidance, resolution) -> dict[str, dict[int, float]]:
    """{layer: {bits: image error}}: 10^(-PSNR/10) of images with only that layer quantised."""
    gen = handle.adapter.generate
    ref = gen(handle.pipeline, prompts, seeds, steps, guidance, resolution)
    out: dict[str, dict[int, float]] = {}
    for n, mod in tqdm(modules.items(), desc="image sensitivity", leave=False):
        w0 = mod.weight.data
        out[n] = {}
        for b in candidates:
            if b >= 16:
                out[n][b] = 0.0
                continue
            mod.weight.data = fake_quant_weight(w0, b, group_size).to(w0.dtype)
            try:
                img = gen(handle.pipeline, prompts, seeds, steps, guidance, resolution)
            finally:
                mod.weight.data = w0
            out[n][b] = 10.0 ** (-_psnr(ref, img) / 10.0)
    return out
