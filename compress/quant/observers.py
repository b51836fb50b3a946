"""Calibration statistics gathered by forward pre-hooks on weight-bearing layers.

Two accumulators, both fed with the layer's input flattened to rows ``[tokens, in_features]``:

- :class:`ActStats`: per-input-channel absmax, per-tensor absmax, a log2-spaced histogram of
  ``|x|`` for percentiles, and the token count; kept separately per group id (e.g. a timestep
  group) when a ``group_fn`` is given, so activation scales can be chosen per denoising phase.
- :class:`HessianStats`: ``H = sum x^T x`` and the number of rows, the proxy Hessian GPTQ needs.

``nn.Conv2d`` inputs are unfolded into patches, so a patch embedder's statistics line up with
``weight.flatten(1)`` exactly as a Linear's do with its weight.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from typing_extensions import Self  # typing.Self needs 3.11; the project supports 3.10

# Histogram of log2|x|: 16 bins an octave over [2^-24, 2^24] is ~4% relative resolution, exact
# counts and a fixed few KB per layer, where a sample-based percentile would need RNG and memory.
_LOG2_LO, _LOG2_HI, _BINS_PER_OCTAVE = -24.0, 24.0, 16
_N_BINS = int((_LOG2_HI - _LOG2_LO) * _BINS_PER_OCTAVE)


def input_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer input as rows ``[n, fan_in]`` matching ``weight.flatten(1)`` columns."""
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise ValueError(f"observers: grouped Conv2d not supported: {module}")
        return patch_rows(module, x)
    return x.reshape(-1, x.shape[-1])


def patch_rows(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A Conv2d input unfolded into patch rows ``[n, in_channels * kh * kw]``.

    For ``groups > 1`` group ``g`` reads columns ``g * fan_in : (g + 1) * fan_in`` (see
    :func:`rows_linear`). Padding (any mode, "same" included) is applied the way the conv does.
    """
    pad = conv._reversed_padding_repeated_twice
    if any(pad):
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        x = F.pad(x, pad, mode=mode)
    cols = F.unfold(x, conv.kernel_size, conv.dilation, 0, conv.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def rows_linear(rows: torch.Tensor, w: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """``rows [n, groups * fan_in] @ w[out, fan_in]^T`` per group: a (grouped) conv on patches."""
    if groups == 1:
        return rows @ w.T
    n = rows.shape[0]
    x = rows.reshape(n, groups, -1)
    wg = w.reshape(groups, w.shape[0] // groups, -1)
    return torch.einsum("ngk,gok->ngo", x, wg).reshape(n, w.shape[0])


@dataclass
class ActStats:
    """Running activation statistics of one layer input (for one group)."""

    in_features: int
    chan_absmax: torch.Tensor = field(init=False)
    absmax: float = 0.0
    count: int = 0
    hist: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.chan_absmax = torch.zeros(self.in_features)
        self.hist = torch.zeros(_N_BINS + 1, dtype=torch.int64)  # bin 0 holds exact zeros

    @torch.no_grad()
    def update(self, rows: torch.Tensor) -> None:
        a = rows.detach().abs().float()
        self.chan_absmax = torch.maximum(self.chan_absmax, a.amax(dim=0).cpu())
        self.absmax = max(self.absmax, float(a.max()))
        self.count += a.shape[0]
        flat = a.flatten()
        nz = flat > 0
        idx = torch.zeros_like(flat, dtype=torch.int64)
        pos = ((flat[nz].log2() - _LOG2_LO) * _BINS_PER_OCTAVE).floor().long()
        idx[nz] = pos.clamp(0, _N_BINS - 1) + 1
        self.hist += torch.bincount(idx, minlength=_N_BINS + 1).cpu()

    def percentile(self, q: float) -> float:
        """Approximate ``q``-th percentile (0..100) of ``|x|``, interpolated inside a log bin."""
        total = int(self.hist.sum())
        if total == 0:
            return 0.0
        target = q / 100.0 * total
        cum = torch.cumsum(self.hist, 0)
        b = int(torch.searchsorted(cum, torch.tensor(target, dtype=cum.dtype), right=False))
        b = min(b, _N_BINS)
        if b == 0:
            return 0.0
        before = int(cum[b - 1]) if b > 0 else 0
        frac = (target - before) / max(int(self.hist[b]), 1)
        lo = _LOG2_LO + (b - 1) / _BINS_PER_OCTAVE
        val = 2.0 ** (lo + min(max(frac, 0.0), 1.0) / _BINS_PER_OCTAVE)
        # the histogram cannot know the true maximum inside the last bin; never exceed it
        return min(val, self.absmax)

    def merge(self, other: ActStats) -> ActStats:
        out = ActStats(self.in_features)
        out.chan_absmax = torch.maximum(self.chan_absmax, other.chan_absmax)
        out.absmax = max(self.absmax, other.absmax)
        out.count = self.count + other.count
        out.hist = self.hist + other.hist
        return out


@dataclass
class HessianStats:
    """``H = sum_rows x^T x`` with its row count; fp32 by default, fp64 for very long runs."""

    in_features: int
    dtype: torch.dtype = torch.float32
    h: torch.Tensor = field(init=False)
    count: int = 0

    def __post_init__(self) -> None:
        self.h = torch.zeros(self.in_features, self.in_features, dtype=self.dtype)

    @torch.no_grad()
    def update(self, rows: torch.Tensor) -> None:
        r = rows.detach().to(self.dtype)
        self.h += (r.T @ r).cpu()
        self.count += r.shape[0]

    def mean(self) -> torch.Tensor:
        """``H / n``: the scale GPTQ is indifferent to, but comparable across layers."""
        return self.h / max(self.count, 1)


def _fan_in(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.in_features
    if isinstance(module, nn.Conv2d):
        return module.weight[0].numel()
    raise TypeError(f"observers: expected nn.Linear or nn.Conv2d, got {type(module).__name__}")


class Observers:
    """Hooks on a set of layers and the statistics they collect.

    ``act[name][group]`` is an :class:`ActStats` (group is ``None`` without a ``group_fn``);
    ``hessian[name]`` a :class:`HessianStats` over all groups. Use as a context manager, or call
    :meth:`remove` when calibration is done.
    """

    def __init__(
        self,
        modules: Mapping[str, nn.Module],
        group_fn: Callable[[], Hashable] | None = None,
        act: bool = True,
        hessian: bool = False,
        hessian_dtype: torch.dtype = torch.float32,
    ) -> None:
        self.group_fn = group_fn
        self.act: dict[str, dict[Hashable, ActStats]] = {}
        self.hessian: dict[str, HessianStats] = {}
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        for name, mod in modules.items():
            n_in = _fan_in(mod)
            if act:
                self.act[name] = {}
            if hessian:
                self.hessian[name] = HessianStats(n_in, hessian_dtype)
            self.handles.append(
                mod.register_forward_pre_hook(self._hook(name, mod, n_in), with_kwargs=True)
            )

    def _hook(self, name: str, mod: nn.Module, n_in: int) -> Callable:
        def hook(m: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else kwargs.get("input")
            if x is None:
                return
            with torch.no_grad():
                rows = input_rows(mod, x)
                if name in self.act:
                    g = self.group_fn() if self.group_fn is not None else None
                    per_group = self.act[name]
                    if g not in per_group:
                        per_group[g] = ActStats(n_in)
                    per_group[g].update(rows)
                if name in self.hessian:
                    self.hessian[name].update(rows)

        return hook

    def merged(self, name: str) -> ActStats:
        """One layer's activation statistics over every group."""
        groups = list(self.act[name].values())
        if not groups:
            raise KeyError(f"observers: layer {name!r} never ran during calibration")
        out = groups[0]
        for s in groups[1:]:
            out = out.merge(s)
        return out

    def groups(self, name: str) -> list[Hashable]:
        return list(self.act.get(name, {}))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def attach(
    modules: Mapping[str, nn.Module] | Iterable[tuple[str, nn.Module]],
    group_fn: Callable[[], Hashable] | None = None,
    act: bool = True,
    hessian: bool = False,
    hessian_dtype: torch.dtype = torch.float32,
) -> Observers:
    """Hook ``modules`` (name -> nn.Linear / nn.Conv2d); the returned :class:`Observers` collects.

    Args:
        modules: layers to observe, by name.
        group_fn: called at every forward to get the current group id (e.g. the timestep group
            the pass is calibrating); statistics are kept per id.
        act: collect :class:`ActStats`.
        hessian: collect :class:`HessianStats` (``in x in`` per layer: mind the memory).
        hessian_dtype: accumulation dtype of the Hessian.
    """
    return Observers(dict(modules), group_fn, act, hessian, hessian_dtype)
