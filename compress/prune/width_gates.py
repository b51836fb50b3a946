"""Gates on the elements (heads, channels) of width units, where they enter the layers that read
them, and the parameter count each element holds.

A unit's elements enter its ``inputs`` layers (the out-projections, the feed-forward's last
layer; FLUX single blocks' proj_out at a column offset) as groups of ``group`` consecutive input
columns (channels of a 1x1 conv). Scaling an element's columns by 0 computes exactly what
removing it computes (see :mod:`compress.models.width`), so one gate per element serves every
width method: reading the activations (activation importance), the gradient of a gate at 1
(Taylor importance) and trained masks (learnable).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from compress.models.width_units import Unit


def _layer_dim(m: nn.Module) -> int:
    """The dimension of a layer's input that holds its input features."""
    return 1 if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) else -1


class Gates:
    """Forward pre-hooks that multiply each unit's element columns by ``gate[unit]`` (a tensor of
    ``count`` values; a unit without a gate passes unchanged) and optionally record, per element,
    the mean absolute activation over the tokens seen."""

    def __init__(self, root: nn.Module, units: list[Unit], record: bool = False) -> None:
        self.units = units
        self.gate: dict[str, torch.Tensor] = {}
        self.record = record
        self.abs_sum: dict[str, torch.Tensor] = {u.name: torch.zeros(u.count, dtype=torch.float64)
                                                 for u in units}
        self.tokens: dict[str, int] = dict.fromkeys(self.abs_sum, 0)
        by_layer: dict[str, list[tuple[Unit, int]]] = {}
        for u in units:
            for layer in u.inputs:
                by_layer.setdefault(layer, []).append((u, u.offset.get(layer, 0)))
        self._h = [root.get_submodule(layer).register_forward_pre_hook(self._hook(layer, spans))
                   for layer, spans in by_layer.items()]

    def _hook(self, layer: str, spans: list[tuple[Unit, int]]):
        def hook(mod, args):
            x = args[0]
            dim = _layer_dim(mod)
            if self.record:
                for u, off in spans:
                    if layer != u.inputs[0]:
                        continue  # a unit's activations are read once, at its first layer
                    part = x.narrow(dim, off, u.count * u.group).detach().float().abs()
                    part = part.movedim(dim, -1).reshape(-1, u.count, u.group)
                    self.abs_sum[u.name] += part.mean(-1).sum(0).double().cpu()
                    self.tokens[u.name] += part.shape[0]
            if not any(u.name in self.gate for u, _ in spans):
                return None
            size = x.shape[dim]
            pieces, at = [], 0
            for u, off in sorted(spans, key=lambda s: s[1]):
                g = self.gate.get(u.name)
                if g is None:
                    continue
                if off > at:
                    pieces.append(torch.ones(off - at, dtype=x.dtype, device=x.device))
                pieces.append(g.to(x.dtype).repeat_interleave(u.group))
                at = off + u.count * u.group
            if at < size:
                pieces.append(torch.ones(size - at, dtype=x.dtype, device=x.device))
            full = torch.cat(pieces)
            if dim != -1:
                full = full.view(-1, *([1] * (x.dim() - 2)))
            return (x * full, *args[1:])

        return hook

    def mean_abs(self) -> dict[str, torch.Tensor]:
        return {n: (s / max(self.tokens[n], 1)).float() for n, s in self.abs_sum.items()}

    def remove(self) -> None:
        for h in self._h:
            h.remove()
        self._h.clear()


def _per_row(m: nn.Module) -> int:
    """Parameters one output row of a layer holds (its weight row and bias)."""
    w = m.weight
    return math.prod(w.shape[1:]) + (1 if getattr(m, "bias", None) is not None else 0)


def _per_col(m: nn.Module) -> int:
    """Parameters one input column of a layer holds (0 for a depthwise conv: rows hold them)."""
    w = m.weight
    if isinstance(m, (nn.Conv1d, nn.Conv2d)) and m.groups > 1:
        return 0
    return w.shape[0] * math.prod(w.shape[2:])


def element_cost(root: nn.Module, u: Unit) -> int:
    """Parameters removed with one element of the unit."""
    cost = 0
    for layer in u.outputs:
        cost += _per_row(root.get_submodule(layer)) * u.group * u.parts.get(layer, 1)
    for layer in u.inputs:
        cost += _per_col(root.get_submodule(layer)) * u.group
    for norm in u.sized:
        for p in root.get_submodule(norm).parameters(recurse=False):
            cost += math.prod(p.shape[1:]) * u.group
    return cost


def magnitude(root: nn.Module, u: Unit) -> torch.Tensor:
    """L2 norm of each element's weights: its rows in the output layers, its columns in the
    input layers (the weight-magnitude baseline)."""
    total = torch.zeros(u.count, dtype=torch.float64)
    for layer in u.outputs:
        w = root.get_submodule(layer).weight.detach().double()
        parts = u.parts.get(layer, 1)
        rows = w.reshape(parts, u.count, u.group, -1)
        total += rows.pow(2).sum(dim=(0, 2, 3))
    for layer in u.inputs:
        m = root.get_submodule(layer)
        w = m.weight.detach().double()
        off = u.offset.get(layer, 0)
        if isinstance(m, (nn.Conv1d, nn.Conv2d)) and m.groups > 1:
            continue
        cols = w.narrow(1, off, u.count * u.group).movedim(1, 0)
        total += cols.reshape(u.count, u.group, -1).pow(2).sum(dim=(1, 2))
    return total.sqrt().float()
