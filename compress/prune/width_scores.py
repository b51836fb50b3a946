"""Importance of each head and feed-forward channel from the calibration samples.

- ``activation``: the mean absolute value of the element's output (a head's attention output,
  a channel's activation) where it enters the out-projection, over the calibration tokens.
- ``taylor``: first order. Switching element e off changes the output y by about
  ``-dy/dg_e`` (g_e its gate at 1); the score is the expected squared change, estimated as the
  mean of ``(d(r . y)/dg_e)^2`` over the samples with a fresh Gaussian probe r each (its
  expectation over r is ``|dy/dg_e|^2``), i.e. |activation x gradient| of a random projection
  of the output.
- ``magnitude``: the L2 norm of the element's weights (rows it produces, columns it feeds).
- ``random``: uniform random scores from the seed.
"""

from __future__ import annotations

import torch

from compress.models.width_units import Unit
from compress.prune.width_gates import Gates, magnitude


def activation(handle, samples, units: list[Unit]) -> dict[str, torch.Tensor]:
    from compress.calib.dataset import replay

    gates = Gates(handle.transformer, units, record=True)
    try:
        replay(handle, samples)
    finally:
        gates.remove()
    return gates.mean_abs()


def taylor(handle, samples, units: list[Unit], seed: int) -> dict[str, torch.Tensor]:
    tr, ad = handle.transformer, handle.adapter
    dev = handle.run.get("device", "cpu")
    gates = Gates(tr, units)
    total = {u.name: torch.zeros(u.count, dtype=torch.float64) for u in units}
    flags = {n: p.requires_grad for n, p in tr.named_parameters()}
    gen = torch.Generator().manual_seed(seed)
    try:
        tr.requires_grad_(False)
        for i in range(len(samples)):
            s = samples.sample(i).to(dev)
            g = {u.name: torch.ones(u.count, requires_grad=True) for u in units}
            gates.gate = g
            y = ad.call(tr, s.args, s.kwargs)
            r = torch.randn(y.shape, generator=gen).to(y.device, y.dtype)
            grads = torch.autograd.grad((y * r).sum(), [g[u.name] for u in units],
                                        allow_unused=True)
            for u, d in zip(units, grads):
                if d is not None:
                    total[u.name] += d.detach().double().pow(2)
    finally:
        gates.remove()
        for n, p in tr.named_parameters():
            p.requires_grad_(flags.get(n, True))
    return {n: (t / max(len(samples), 1)).float() for n, t in total.items()}


def weight_magnitude(handle, units: list[Unit]) -> dict[str, torch.Tensor]:
    return {u.name: magnitude(handle.transformer, u) for u in units}


def random_scores(units: list[Unit], seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {u.name: torch.rand(u.count, generator=gen) for u in units}


def comparable(scores: dict[str, torch.Tensor], costs: dict[str, int],
               per_parameter: bool) -> dict[str, torch.Tensor]:
    """Keys that rank elements of different units against each other: each unit's scores over
    their mean (a unit's scale says nothing across layers), or, for scores that estimate one
    quantity everywhere (Taylor's output change), that quantity per parameter removed."""
    out = {}
    for name, s in scores.items():
        if per_parameter:
            out[name] = s / max(costs[name], 1)
        else:
            m = float(s.mean())
            out[name] = s / m if m > 0 else s
    return out
