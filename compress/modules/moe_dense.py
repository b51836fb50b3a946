"""Small mixture-of-experts layers run in the dense masked form when that is faster.

The sparse form gathers each expert's tokens, runs its matmul on them and scatters the results
back: a handful of small operations per expert, which on a small model (the demo's 256-wide
blocks, 32 tokens a call) cost more than running every expert on every token and zeroing the
ones a token did not choose. At the first inference call of a feed-forward (no gradients), its
MoEIn times both forms on its real input and the pair keeps the faster; the values are the same
up to the order of float additions. Training runs sparse. Decisions are cached per process by
shape; ``DIT_COMPRESS_MOE_DENSE=never`` or ``=always`` forces the choice. The routing, its load
statistics and the report's active parameters are the same in both forms (they count what a
token was routed to); only where the time goes differs.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from compress.metrics.timing import best_seconds

_DECISIONS: dict[tuple, str] = {}


@torch.no_grad()
def choose(layer: Any, x: torch.Tensor, xt: torch.Tensor, samples: int) -> str:
    """"dense" or "sparse" for ``layer``'s feed-forward (its MoEIn's forward on ``x``)."""
    forced = os.environ.get("DIT_COMPRESS_MOE_DENSE", "auto").strip().lower()
    if forced in ("never", "always"):
        return "dense" if forced == "always" else "sparse"
    route = layer.route
    key = (layer.dim, layer.hidden, layer.parts, route.experts, route.top_k, xt.shape[0],
           xt.dtype, layer.act, layer.conv)
    if key not in _DECISIONS:
        collect, route.collect = route.collect, False  # timing calls are not counted
        try:
            def sparse() -> None:
                route.clear()
                route.compute(x, xt, samples)
                (layer._packed(x, xt) if layer.act is not None else layer._scatter(x, xt))

            dense = best_seconds(lambda: layer._dense(x, xt, samples))
            _DECISIONS[key] = "dense" if dense < best_seconds(sparse) else "sparse"
        finally:
            route.collect = collect
            route.clear()
    return _DECISIONS[key]
