"""Per-layer sensitivity for mixed precision, by two metrics:

- output: the layer's own relative output error at each candidate bit width, on its captured
  calibration inputs (cheap, every layer);
- image: PSNR of the pipeline's decoded images (or a user's sampler's images or latents) with
  only that layer quantised, against the unquantised ones, on a few calibration prompts or
  seeds (what users see; one sampling run per layer and candidate);
- image, first order (``image_estimate: first_order``, pipelines): the expected squared change
  of the final denoised latent when a layer's weight moves by its quantisation error dW,
  estimated for every layer and candidate at once from a few backward passes through the whole
  sampling trajectory: with Gaussian probes r, E[(r . J dW)^2] = |J dW|^2, and one backward of
  r . latent gives r . J for every weight. One sampling run per prompt and a backward pass per
  probe, whatever the number of layers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from compress.quant.mixed import FLOAT_BITS, output_sensitivity
from compress.quant.smooth import fake_quant_weight

log = logging.getLogger(__name__)


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


@torch.no_grad()
def image_tables(generate: Callable[[], tuple[np.ndarray, str]],
                 modules: Mapping[str, torch.nn.Module], choices: Mapping[str, Choice]
                 ) -> dict[str, dict[int, float]]:
    """{layer: {bits: image error}}: 10^(-PSNR/10) of the samples with only that layer's
    weight quantised (Linear or Conv2d) against the unquantised ones, 0 for the full-precision
    option. ``generate()`` returns (samples, kind) on fixed seeds: a pipeline's images or a
    user's sampler's images or latents (compress.metrics.own)."""
    from compress.metrics.own import sample_error

    ref, kind = generate()
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
                got, _ = generate()
            finally:
                mod.weight.data = w0
            out[n][b] = max(sample_error(ref, got, kind), 1e-10)
    return out


def first_order_tables(latents: Callable[[], list[torch.Tensor]],
                       modules: Mapping[str, torch.nn.Module], choices: Mapping[str, Choice],
                       probes: int, seed: int = 0) -> dict[str, dict[int, float]]:
    """{layer: {bits: estimated mean squared change of the final latent}} with only that layer
    quantised, 0 for the full-precision option. ``latents()`` runs the sampler (with autograd
    through it) and returns its final latents."""
    names = list(modules)
    weights = [modules[n].weight for n in names]
    flags = [w.requires_grad for w in weights]
    deltas = {}
    for n, w in zip(names, weights):
        c = choices[n]
        w0 = w.detach()
        deltas[n] = {b: (fake_quant_weight(w0.flatten(1), b, c.group_size, c.symmetric)
                         .reshape(w0.shape).to(w0.dtype) - w0)
                     for b in c.candidates if b < FLOAT_BITS}
    total = {n: dict.fromkeys(deltas[n], 0.0) for n in names}
    gen = torch.Generator().manual_seed(seed)
    runs = 0
    try:
        for w in weights:
            w.requires_grad_(True)
        # one sampling run serves every probe: the trajectory does not depend on the probe,
        # so each backward reuses its graph (with time-step checkpointing, each backward
        # recomputes the steps it needs, as the first would)
        outs = latents()
        size = sum(o.numel() for o in outs)
        vecs = [[torch.randn(o.shape, generator=gen).to(o.device, o.dtype) for o in outs]
                for _ in range(probes)]
        try:
            # all probes in one batched backward (vmap over the vectors): the checkpointed
            # steps are recomputed once instead of once per probe
            batched = torch.autograd.grad(
                outs, weights, grad_outputs=[torch.stack([v[k] for v in vecs])
                                             for k in range(len(outs))],
                allow_unused=True, is_grads_batched=True, retain_graph=True)
            per_probe = [[None if g is None else g[i] for g in batched] for i in range(probes)]
        except RuntimeError as e:  # an op without a batching rule: one backward per probe
            log.info("batched probes failed (%s); one backward per probe", e)
            per_probe = None
        for i in tqdm(range(probes), desc="image sensitivity (first order)", leave=False):
            if per_probe is not None:
                grads = per_probe[i]
            else:
                probe = sum((v * o).sum() for v, o in zip(vecs[i], outs))
                grads = torch.autograd.grad(probe, weights, allow_unused=True,
                                            retain_graph=i < probes - 1)
            for n, g in zip(names, grads):
                for b, d in deltas[n].items():
                    v = 0.0 if g is None else float((g.float() * d.float()).sum())
                    total[n][b] += v * v / size
            runs += 1
    finally:
        for w, f in zip(weights, flags):
            w.requires_grad_(f)
    out = {}
    for n in names:
        out[n] = {b: max(total[n][b] / max(runs, 1), 1e-12) for b in deltas[n]}
        out[n].update({b: 0.0 for b in choices[n].candidates if b >= FLOAT_BITS})
    return out
