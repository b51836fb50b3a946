"""Which heads and channels go, given a score per element (higher: more important).

Targets: a parameter count to remove (``sparsity`` of the blocks' parameters) or separate
fractions of the heads and of the channels. ``uniform``: every unit of a kind (the same
attention or feed-forward position in each block) loses the same count; otherwise the elements
of all blocks compete on their keys, and each unit keeps its ``floor``.
Feed-forward keep counts are rounded to a multiple of ``multiple`` (matrix shapes the kernels
like); a unit never loses all its elements.
"""

from __future__ import annotations

import math

import torch

from compress.errors import UserError
from compress.models.width_units import Unit

GLOBAL_MIN_KEEP = 0.1  # global mode: each unit keeps at least this fraction of its elements


def position(u: Unit) -> str:
    """A unit's place in its block ("attn1", "ff", "mlp"): units at one place share counts."""
    return u.name[len(u.block) + 1:] if u.name.startswith(u.block + ".") else u.name


def _floor(u: Unit, multiple: int, uniform: bool) -> int:
    low = 1 if uniform else max(1, math.ceil(GLOBAL_MIN_KEEP * u.count))
    if u.kind == "channels":
        low = max(low, min(multiple, u.count))
    return min(low, u.count)


def _round_keep(u: Unit, keep: int, multiple: int) -> int:
    if u.kind != "channels" or multiple <= 1 or keep >= u.count:
        return keep
    r = max(multiple, round(keep / multiple) * multiple)
    return min(r, u.count)


def removable(units: list[Unit], costs: dict[str, int], multiple: int, uniform: bool) -> int:
    """The most parameters the units can lose (each keeps its floor)."""
    return sum((u.count - _floor(u, multiple, uniform)) * costs[u.name] for u in units)


def _lowest(key: torch.Tensor, n: int) -> list[int]:
    order = sorted(range(len(key)), key=lambda i: (float(key[i]), i))
    return order[:n]


def _keep_lists(units: list[Unit], keys: dict[str, torch.Tensor],
                drop: dict[str, int]) -> dict[str, list[int]]:
    out = {}
    for u in units:
        gone = set(_lowest(keys[u.name], drop.get(u.name, 0)))
        out[u.name] = [i for i in range(u.count) if i not in gone]
    return out


def _uniform_counts(units: list[Unit], costs: dict[str, int], target: int | None,
                    head_ratio: float | None, channel_ratio: float | None,
                    multiple: int) -> dict[str, int]:
    """Elements dropped per unit, the same for every unit at one block position."""
    drop: dict[str, int] = {}
    heads = [u for u in units if u.kind == "heads"]
    chans = [u for u in units if u.kind == "channels"]
    if target is None:
        for u in heads:
            drop[u.name] = min(round((head_ratio or 0) * u.count), u.count - 1)
        for u in chans:
            keep = _round_keep(u, u.count - round((channel_ratio or 0) * u.count), multiple)
            drop[u.name] = u.count - max(keep, _floor(u, multiple, True))
        return drop
    total = sum(u.count * costs[u.name] for u in units)
    frac = target / total if total else 0.0
    for u in heads:
        drop[u.name] = min(round(frac * u.count), u.count - 1)
    left = target - sum(drop[u.name] * costs[u.name] for u in heads)
    chan_total = sum(u.count * costs[u.name] for u in chans)
    cf = max(0.0, left / chan_total) if chan_total else 0.0
    for u in chans:
        keep = _round_keep(u, u.count - round(min(cf, 1.0) * u.count), multiple)
        drop[u.name] = u.count - max(keep, _floor(u, multiple, True))
    return drop


def _global_counts(units: list[Unit], keys: dict[str, torch.Tensor], costs: dict[str, int],
                   target: int | None, head_ratio: float | None, channel_ratio: float | None,
                   multiple: int) -> dict[str, int]:
    """Elements dropped per unit when all blocks' elements compete on their keys."""
    drop = dict.fromkeys((u.name for u in units), 0)
    floor = {u.name: _floor(u, multiple, False) for u in units}
    count = {u.name: u.count for u in units}

    def pool(kinds: set[str]) -> list[tuple[float, str, int]]:
        items = [(float(keys[u.name][i]), u.name, i) for u in units if u.kind in kinds
                 for i in range(u.count)]
        return sorted(items)

    if target is None:
        for kind, ratio in (("heads", head_ratio), ("channels", channel_ratio)):
            members = [u for u in units if u.kind == kind]
            want = round((ratio or 0) * sum(u.count for u in members))
            for _, name, _ in pool({kind}):
                if want <= 0:
                    break
                if count[name] - drop[name] > floor[name]:
                    drop[name] += 1
                    want -= 1
    else:
        removed = 0
        for _, name, _ in pool({"heads", "channels"}):
            c = costs[name]
            if removed >= target:
                break
            if count[name] - drop[name] <= floor[name] or removed + c > target + c / 2:
                continue
            drop[name] += 1
            removed += c
    for u in units:  # feed-forward widths to the multiple
        if u.kind == "channels":
            keep = _round_keep(u, u.count - drop[u.name], multiple)
            drop[u.name] = u.count - max(keep, floor[u.name])
    return drop


def choose(units: list[Unit], keys: dict[str, torch.Tensor], costs: dict[str, int], *,
           target: int | None, head_ratio: float | None = None,
           channel_ratio: float | None = None, uniform: bool = True,
           multiple: int = 1) -> dict[str, list[int]]:
    """{unit: element indices kept}. ``keys``: per unit a tensor of ``count`` values, lower goes
    first (in global mode they must be comparable across units). ``target``: parameters to
    remove (None: use the ratios)."""
    for u in units:
        if keys[u.name].shape != (u.count,):
            raise ValueError(f"{u.name}: {tuple(keys[u.name].shape)} scores for {u.count} "
                             "elements")
    if target is not None and target > removable(units, costs, multiple, uniform):
        raise UserError(f"prune_width: removing {target} parameters asks more than the heads "
                        f"and channels hold ({removable(units, costs, multiple, uniform)} "
                        "removable); lower sparsity")
    drop = _uniform_counts(units, costs, target, head_ratio, channel_ratio, multiple) \
        if uniform else _global_counts(units, keys, costs, target, head_ratio, channel_ratio,
                                       multiple)
    return _keep_lists(units, keys, drop)
