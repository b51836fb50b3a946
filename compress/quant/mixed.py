"""Mixed precision: measure how much each layer suffers at each bit width, then choose the bits
that minimise the summed error under a storage budget.

The allocation is a multiple-choice knapsack solved by dynamic programming on a cost grid. Each
layer's cheapest option is the baseline; the extra cost of every other option is counted in
grid units, exactly when the common divisor of the stored sizes allows it within ``resolution``
units, else rounded *up*, so the true total never exceeds the budget. The grid does not depend
on the budget, and the table it fills is the best error for every capacity at once, so a larger
budget can never pick a worse allocation. Rounding up wastes at most ``n_layers / resolution``
of the range from everything-cheapest to everything-dearest: for 300 layers with options 3..16
bits, at most 0.03 bits a weight at the default resolution, typically half that.

Errors are summed across layers, so they must be in one unit: relative output MSE from
:func:`output_sensitivity`, ``10^(-dB/10)`` of an image PSNR or SQNR (:func:`db_to_error`), or a
mix of metrics each scaled by :func:`normalise` first (metric-decoupled sensitivity).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from compress.quant import qtensor
from compress.quant.observers import rows_linear
from compress.quant.qtensor import sqnr_db
from compress.quant.smooth import ActGranularity, fake_quant_act, fake_quant_weight

FLOAT_BITS = 16  # the "not quantised" option: 16-bit weights, no scales
CostFn = Callable[[str, int], float]  # (layer, bits) -> stored bits per weight


# ---- storage cost ----------------------------------------------------------------------------


def bits_per_weight(
    bits: int, in_features: int, group_size: int | None = None, symmetric: bool = True
) -> float:
    """Stored bits per weight of qtensor's format: codes plus fp16 scales (+ uint8 zeros)."""
    if bits >= FLOAT_BITS:
        return float(bits)
    g = qtensor.n_groups(in_features, group_size)
    return bits + g * (16 + (0 if symmetric else 8)) / in_features


def storage_cost(
    in_features: Mapping[str, int], group_size: int | None = None, symmetric: bool = True
) -> CostFn:
    """A cost function for :func:`allocate` that counts scale overhead from each layer's fan-in."""
    return lambda name, bits: bits_per_weight(bits, in_features[name], group_size, symmetric)


# ---- allocation ------------------------------------------------------------------------------


@dataclass
class Allocation:
    bits: dict[str, int]  # chosen bits per layer
    error: float  # summed sensitivity of the choice
    cost_bits: float  # stored bits of the allocated layers, scale overhead included
    params: int  # parameters of the allocated layers

    @property
    def avg_bits(self) -> float:
        return self.cost_bits / max(self.params, 1)

    @property
    def bytes(self) -> float:
        return self.cost_bits / 8


def allocate(
    sensitivity: Mapping[str, Mapping[int, float]],
    params: Mapping[str, int],
    avg_bits: float | None = None,
    max_bytes: float | None = None,
    cost: CostFn | None = None,
    keep_high: Iterable[str] = (),
    resolution: int = 1 << 17,
) -> Allocation:
    """Bits per layer minimising the summed error under a budget.

    Args:
        sensitivity: ``{layer: {bits: error}}``; the keys of each inner table are the options
            (include 16 to allow keeping a layer unquantised).
        params: parameter count per layer.
        avg_bits: budget as stored bits per weight averaged over these layers.
        max_bytes: budget as stored bytes of these layers (the tighter of the two applies).
        cost: stored bits per weight of ``(layer, bits)``; default ``bits`` (no scale overhead;
            see :func:`storage_cost`).
        keep_high: layers forced to their highest option (their cost counts in the budget).
        resolution: cost-grid units; more is closer to optimal, linear in time and memory.

    Raises:
        ValueError: no budget, unknown layers, or a budget below the cheapest allocation.
    """
    if avg_bits is None and max_bytes is None:
        raise ValueError("allocate: give avg_bits or max_bytes")
    names = list(sensitivity)
    missing = [n for n in names if n not in params]
    forced = set(keep_high)
    unknown = sorted(forced - set(names))
    if missing or unknown:
        raise ValueError(f"allocate: no params for {missing}, keep_high not in table: {unknown}")
    cost_fn: CostFn = cost or (lambda name, bits: float(bits))
    total_params = sum(int(params[n]) for n in names)
    budget = float("inf")
    if avg_bits is not None:
        budget = min(budget, avg_bits * total_params)
    if max_bytes is not None:
        budget = min(budget, 8.0 * max_bytes)

    # Per layer: options sorted by cost, as (bits, cost in stored bits, error).
    opts: dict[str, list[tuple[int, float, float]]] = {}
    for n in names:
        table = sensitivity[n]
        if not table:
            raise ValueError(f"allocate: empty sensitivity table for {n!r}")
        choices = [max(table)] if n in forced else list(table)
        rows = [(b, cost_fn(n, b) * int(params[n]), float(table[b])) for b in choices]
        opts[n] = sorted(rows, key=lambda r: (r[1], r[2]))

    base_cost = sum(o[0][1] for o in opts.values())
    if base_cost > budget * (1 + 1e-12):
        raise ValueError(
            f"allocate: budget {budget / total_params:.3f} bits/weight is below the cheapest "
            f"allocation ({base_cost / total_params:.3f}, keep_high layers included)"
        )
    span = sum(o[-1][1] - o[0][1] for o in opts.values())
    free = [n for n in names if len(opts[n]) > 1]
    chosen = {n: opts[n][0][0] for n in names}
    if not free or span <= 0:
        return _result(chosen, opts, params, names)

    extras = [[c - opts[n][0][1] for _, c, _ in opts[n]] for n in free]
    unit, layer_units = _grid(extras, span, resolution)
    # per-layer ceilings can sum past `resolution`; the slack keeps all-dearest representable
    cap = max(int(min(sum(u[-1] for u in layer_units), np.floor((budget - base_cost) / unit))), 0)
    # best[c]: least summed error of the layers so far using at most c extra units.
    best = np.zeros(cap + 1)
    picks = np.zeros((len(free), cap + 1), dtype=np.int8)
    for k, n in enumerate(free):
        units = layer_units[k]
        new = np.full(cap + 1, np.inf)
        for j, ((_, _, err), u) in enumerate(zip(opts[n], units, strict=True)):
            if u > cap:
                continue
            cand = best[: cap + 1 - u] + err
            better = cand < new[u:]
            new[u:][better] = cand[better]
            picks[k, u:][better] = j
        best = new
    c = cap
    for k in range(len(free) - 1, -1, -1):
        j = int(picks[k, c])
        chosen[free[k]] = opts[free[k]][j][0]
        c -= layer_units[k][j]
    return _result(chosen, opts, params, names)


def _grid(
    extras: list[list[float]], span: float, resolution: int
) -> tuple[float, list[list[int]]]:
    """Cost unit and each option's extra cost in units (rounded up).

    Stored sizes are whole bits, so when the common divisor of every extra cost gives at most
    ``resolution`` units the grid is exact (nothing is rounded, budgets that a combination hits
    exactly stay reachable); otherwise ``span / resolution`` with rounding up.
    """
    flat = [e for row in extras for e in row if e > 0]
    if all(abs(e - round(e)) <= 1e-6 * max(1.0, e) for e in flat):
        div = 0
        for e in flat:
            div = math.gcd(div, round(e))
        if div > 0 and span / div <= resolution:
            return float(div), [[round(e) // div for e in row] for row in extras]
    unit = span / resolution
    return unit, [[int(np.ceil(e / unit)) for e in row] for row in extras]


def _result(
    chosen: dict[str, int],
    opts: Mapping[str, list[tuple[int, float, float]]],
    params: Mapping[str, int],
    names: Sequence[str],
) -> Allocation:
    row = {n: next(r for r in opts[n] if r[0] == chosen[n]) for n in names}
    return Allocation(
        bits=dict(chosen),
        error=sum(r[2] for r in row.values()),
        cost_bits=sum(r[1] for r in row.values()),
        params=sum(int(params[n]) for n in names),
    )


# ---- sensitivity -----------------------------------------------------------------------------


@torch.no_grad()
def output_sensitivity(
    weight: torch.Tensor,
    x: torch.Tensor,
    candidates: Sequence[int] = (3, 4, 6, 8),
    group_size: int | None = None,
    symmetric: bool = True,
    a_bits: int | None = None,
    a_granularity: ActGranularity = "token",
    quantizer: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
    groups: int = 1,
) -> dict[int, dict[str, float]]:
    """One layer's output error at each candidate bit width, on captured inputs.

    Args:
        weight: [out, fan_in] (a conv weight flattened; ``x`` then its unfolded patches).
        x: inputs [..., fan_in] captured on calibration data (one timestep group, or all).
        candidates: weight bits to try; 16 means unquantised (zero error without ``a_bits``).
        group_size, symmetric: weight format as ``qtensor.quantize``.
        a_bits, a_granularity: also quantise the activation, when the layer will run WxAy.
        quantizer: ``(weight, bits) -> dequantised weight`` replacing round-to-nearest, e.g. a
            GPTQ closure, so sensitivity is measured with the method that will be used.
        groups: a grouped conv's groups (``x`` then holds every group's patches side by side).

    Returns:
        ``{bits: {"rel_mse": ||y - y_q||^2 / ||y||^2, "sqnr_db": ...}}``.
    """
    wf = weight.float()
    xf = x.reshape(-1, wf.shape[1] * groups).float()
    ref = rows_linear(xf, wf, groups)
    xq = fake_quant_act(xf, a_bits, a_granularity)
    out: dict[int, dict[str, float]] = {}
    for b in candidates:
        if b >= FLOAT_BITS:
            wq = wf
        elif quantizer is not None:
            wq = quantizer(wf, b).float()
        else:
            wq = fake_quant_weight(wf, b, group_size, symmetric)
        y = rows_linear(xq, wq, groups)
        rel = float((y - ref).pow(2).sum() / ref.pow(2).sum().clamp_min(1e-30))
        out[b] = {"rel_mse": rel, "sqnr_db": sqnr_db(ref, y)}
    return out


def table(sens: Mapping[int, Mapping[str, float]], metric: str = "rel_mse") -> dict[int, float]:
    """``{bits: error}`` from :func:`output_sensitivity`'s result (``sqnr_db`` turned to error)."""
    if metric.endswith("_db"):
        return {b: db_to_error(v[metric]) for b, v in sens.items()}
    return {b: float(v[metric]) for b, v in sens.items()}


def db_to_error(db: float) -> float:
    """A PSNR/SQNR in dB as a relative squared error, so layers' losses add up."""
    return 0.0 if db == float("inf") else float(10.0 ** (-db / 10.0))


def normalise(
    tables: Mapping[str, Mapping[int, float]], ref_bits: int | None = None
) -> dict[str, dict[int, float]]:
    """Scale a metric's tables so their sum over layers at ``ref_bits`` (default the lowest
    option) is 1: metrics in different units then weigh alike when added."""
    lows = [
        t[ref_bits] if ref_bits is not None else t[min(t)] for t in tables.values() if t
    ]
    total = sum(lows) or 1.0
    return {n: {b: v / total for b, v in t.items()} for n, t in tables.items()}


def combine(
    metrics: Sequence[Mapping[str, Mapping[int, float]]],
    weights: Sequence[float] | None = None,
    how: Literal["sum", "max"] = "sum",
) -> dict[str, dict[int, float]]:
    """Merge several ``{layer: {bits: error}}`` tables (metrics, or timestep groups).

    ``sum`` is a weighted sum (normalise differing metrics first); ``max`` keeps the worst
    case, e.g. across timestep groups so no phase of the sampling is sacrificed.
    """
    w = list(weights) if weights is not None else [1.0] * len(metrics)
    out: dict[str, dict[int, float]] = {}
    for layer in metrics[0]:
        bits = set.intersection(*(set(m[layer]) for m in metrics))
        if how == "max":
            out[layer] = {b: max(m[layer][b] for m in metrics) for b in sorted(bits)}
        else:
            out[layer] = {
                b: sum(wi * m[layer][b] for wi, m in zip(w, metrics, strict=True))
                for b in sorted(bits)
            }
    return out
