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

The dense form is also what torch.compile traces (its shapes do not depend on the routing). A
small pair whose pieces are plain Linears (no quantised expert, no LoRA on one) runs it as the
dense feed-forward it came from: one matmul over its experts' weights laid side by side (kept,
like :mod:`compress.modules.weight_cache`, while the pieces' weights are unchanged), the
activation, the routing mask on the hidden channels, and one matmul out.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from compress.metrics.timing import best_seconds_alternated
from compress.modules import weight_cache

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
        # the pair's MoEOut: both halves are timed (what runs between them, the activation or
        # Sana's depthwise conv, costs the same in both forms); not where it also reads other
        # columns (FLUX single blocks' attention half), whose input is not MoEIn's alone
        out = route.out if route.out is not None and not route.out.offset else None

        def sparse() -> None:
            route.clear()
            route.compute(x, xt, samples)
            h = layer._packed(x, xt) if layer.act is not None else layer._scatter(x, xt)
            if out is not None:
                out(h)

        def dense() -> None:
            route.clear()
            h = layer._dense(x, xt, samples)
            if out is not None:
                out(h)

        try:
            t_sparse, t_dense = best_seconds_alternated([sparse, dense])
            _DECISIONS[key] = "dense" if t_dense < t_sparse else "sparse"
        finally:
            route.collect = collect
            route.clear()
    return _DECISIONS[key]


# ----------------------------------------------------------------------------- the dense form


def _pieces(layer: Any) -> list[nn.Module]:
    return ([layer.shared] if layer.shared is not None else []) + list(layer.experts)


def _side_by_side(layer: Any, mods: list[nn.Module], dtype: torch.dtype, dim: int,
                  parts: int, packed: bool = False) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """``mods``' weights (and biases) side by side in the order their outputs (dim 0) or inputs
    (dim 1) take in the hidden tensor, each of ``parts`` halves [shared | experts] in turn; kept
    on ``layer`` while the weights are unchanged. None when a piece is not a plain Linear, the
    layer is large, or under torch.compile (which traces the per-expert form). ``packed``: the
    weight kept in oneDNN's layout instead (:func:`weight_cache.packed_linear`)."""
    if torch.compiler.is_compiling() or not weight_cache.ENABLED:
        return None
    # plain dict reads (this runs twice per feed-forward call): None for a piece that is not a
    # plain Linear (quantised, or wrapped by a LoRA), which fails the kept stamp below
    params = [m._parameters if type(m) is nn.Linear else {} for m in mods]
    tensors = [d.get("weight") for d in params] + [d.get("bias") for d in params]
    hit = layer.__dict__.get("_side_by_side")
    if weight_cache.valid(hit, dtype, packed, tensors):
        return hit[3]
    if (any(d.get("weight") is None for d in params)
            or sum(d["weight"].numel() for d in params) > weight_cache.MAX_ELEMENTS):
        return None
    with torch.no_grad():
        if dim == 0:
            w = torch.cat([c for p in range(parts) for m in mods
                           for c in [m.weight.chunk(parts, 0)[p]]], 0)
            b = None if mods[0].bias is None else torch.cat(
                [c for p in range(parts) for m in mods for c in [m.bias.chunk(parts, 0)[p]]])
        else:
            w, b = torch.cat([m.weight for m in mods], 1), None
        w = w.to(dtype).contiguous()
        w = weight_cache.pack(w) if packed else w
        b = b.to(dtype) if b is not None else None
    layer.__dict__["_side_by_side"] = (dtype, packed, weight_cache.stamp(tensors), (w, b))
    return w, b


def _channel_mask(layer: Any, keep: torch.Tensor) -> torch.Tensor:
    """[T, experts] 0/1 -> [T, hidden]: one for the shared channels, the expert's for its own."""
    widths = torch.tensor(layer.widths, device=keep.device)
    m = keep.repeat_interleave(widths, dim=1)
    if layer.shared_width:
        m = torch.cat([keep.new_ones(keep.shape[0], layer.shared_width), m], dim=1)
    return m


def _zero_unchosen(layer: Any, y: torch.Tensor, keep: torch.Tensor, parts: int) -> torch.Tensor:
    """``y * _channel_mask(layer, keep)`` (repeated over ``parts``) in place, without building
    the [T, hidden] mask: each expert's columns scaled by its 0/1 keep (no autograd here)."""
    widths = layer.widths
    if len(set(widths)) != 1:
        return y * _channel_mask(layer, keep).repeat(1, parts)
    t, e, w, s = y.shape[0], len(widths), widths[0], layer.shared_width
    y.view(t, parts, layer.hidden)[:, :, s:].view(t, parts, e, w).mul_(keep[:, None, :, None])
    return y


def forward_in(layer: Any, xt: torch.Tensor, samples: int, act) -> torch.Tensor:
    """MoEIn's dense form on [T, D] tokens: every expert on every token, the ones a token did not
    choose zeroed. [T, parts x hidden] laid out as the sparse form's hidden tensor, or with a
    packed activation [T, hidden] ([shared | expert 0 | ...] after the activation)."""
    route = layer.route
    route.compute_dense(xt, samples)
    keep = (route.mask != 0).to(xt.dtype)
    parts = layer.parts
    packed = weight_cache.use_packed(xt)
    wb = _side_by_side(layer, _pieces(layer), xt.dtype, 0, parts, packed)
    if wb is not None:
        y = weight_cache.matmul(xt, *wb, packed)
        if layer.act is not None:
            y = act(y)  # a gated act joins the halves
            if not torch.is_grad_enabled():
                return _zero_unchosen(layer, y, keep, 1)
            return y * _channel_mask(layer, keep)
        if not torch.is_grad_enabled():
            return _zero_unchosen(layer, y, keep, parts)
        return y * _channel_mask(layer, keep).repeat(1, parts)
    if layer.act is not None:  # per piece: the activation (gated: per piece's halves), masked
        out = []
        for i, lin in enumerate(_pieces(layer)):
            y = act(lin(xt))
            e = i - (layer.shared is not None)
            out.append(y if e < 0 else y * keep[:, e:e + 1])
        return torch.cat(out, dim=-1)
    halves: list[list[torch.Tensor]] = [[] for _ in range(parts)]
    for i, lin in enumerate(_pieces(layer)):
        y = lin(xt)
        e = i - (layer.shared is not None)
        if e >= 0:
            y = y * keep[:, e:e + 1]
        for p, piece in enumerate(y.chunk(parts, dim=-1)):
            halves[p].append(piece)
    return torch.cat([torch.cat(h, dim=-1) for h in halves], dim=-1)


def forward_out(layer: Any, ht: torch.Tensor, a: int) -> torch.Tensor:
    """MoEOut's dense form on [T, columns] (hidden channels from column ``a``): each piece's
    columns through its Linear, an expert's scaled by its gate (zero where not chosen)."""
    route = layer.route
    if not torch.is_grad_enabled():
        # the gates' values are 1 where chosen and MoEIn zeroed the other channels: one matmul
        mods = ([layer.rest] if layer.rest is not None else []) + _pieces(layer)
        packed = weight_cache.use_packed(ht)
        wb = _side_by_side(layer, mods, ht.dtype, 1, 1, packed)
        if wb is not None:
            if not layer.packed:  # what ran between the pair (Sana's depthwise conv, a bias)
                m = _channel_mask(layer, (route.mask != 0).to(ht.dtype))  # may fill channels
                if a:
                    m = torch.cat([m.new_ones(m.shape[0], a), m], dim=1)
                ht = ht * m
            b = layer.bias.to(ht.dtype) if layer.bias is not None else None
            return weight_cache.matmul(ht, wb[0], b, packed)
    y = layer.rest(ht[:, :a]) if layer.rest is not None else None
    if layer.shared is not None:
        z = layer.shared(ht[:, a:a + layer.shared_width])
        y = z if y is None else y + z
    a += layer.shared_width
    for e, lin in enumerate(layer.experts):
        w = layer.widths[e]
        z = lin(ht[:, a:a + w]) * route.mask[:, e:e + 1]
        y = z if y is None else y + z
        a += w
    if layer.bias is not None:
        y = y + layer.bias.to(y.dtype)
    return y
