"""Channel balancing before quantisation: move activation outliers into the weights.

SmoothQuant-style migration: for a Linear ``y = x W^T`` and per-input-channel ``s > 0``,
``y = (x / s) (W * s)^T`` exactly, so dividing the activation's channel ``j`` by ``s_j`` and
multiplying weight column ``j`` by it leaves the float output unchanged while flattening the
activation's channel ranges (``s_j = amax|x_j|^a / amax|W_:j|^(1-a)``).

Folding, generically: multiply the weight columns by ``s`` (:func:`fold_into_weight`) and keep
``1 / s`` as a per-input-channel multiplier buffer applied to the input before it is quantised
(:func:`smooth_input`). Where the previous op is an affine LayerNorm, ``1 / s`` folds into its
weight and bias instead (:func:`fold_into_layernorm`); adaLN's ``x * (1 + scale) + shift`` is
model-specific (the ``1 +`` does not scale with the modulation Linear) and is left to adapters.

Static-dynamic balancing (after ViDiT-Q's observation that DiT channel imbalance has a part
that is the same at every timestep and a part that moves with the timestep), as implemented here
with a single stored weight:

- static: one scale ``s`` from the per-channel envelope over all timestep groups, its strength
  searched jointly on samples from every group (:func:`search_alpha` takes a list), folded into
  the weight once;
- then an optional fixed randomised block-Hadamard rotation ``Q`` (:func:`hadamard`) applied to
  both sides (``x' = (x / s) Q``, ``W' = (W * s) Q``), which spreads whatever imbalance the static
  scale did not remove, including channels that are outliers only at some timesteps, across all
  channels of a block;
- dynamic: what remains changes per token and per timestep, and is left to the activation
  quantiser: per-token dynamic scales, or static scales chosen per timestep group.

The module also holds the fake quantisers used to score a choice (weights through qtensor's own
grid, activations symmetric per token or per tensor); :mod:`compress.quant.lowrank` and
:mod:`compress.quant.mixed` share them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch

from compress.quant import qtensor

ActGranularity = Literal["token", "tensor"]
DEFAULT_ALPHAS = tuple(round(0.05 * i, 2) for i in range(21))


# ---- fake quantisers used to score choices ---------------------------------------------------


def fake_quant_weight(
    w: torch.Tensor, bits: int | None, group_size: int | None = None, symmetric: bool = True
) -> torch.Tensor:
    """Round-trip ``w`` [out, in] through :mod:`qtensor`'s grid; ``bits=None`` leaves it as is."""
    if bits is None or bits >= 16:
        return w.float()
    return qtensor.dequantize(*qtensor.quantize(w, bits, group_size, symmetric), bits)


def fake_quant_act(
    x: torch.Tensor,
    bits: int | None,
    granularity: ActGranularity = "token",
    absmax: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric integer round trip of activations [..., in].

    ``token``: one dynamic scale per row; ``tensor``: one dynamic scale. A calibrated
    ``absmax`` (a scalar for per tensor, or [in] for per channel) makes the scale static
    whatever the granularity: values beyond it clip.
    """
    if bits is None or bits >= 16:
        return x.float()
    xf = x.float()
    qmax = 2 ** (bits - 1) - 1
    if absmax is not None:
        amax = torch.as_tensor(absmax, dtype=torch.float32, device=x.device)
    elif granularity == "token":
        amax = xf.abs().amax(dim=-1, keepdim=True)
    else:
        amax = xf.abs().amax()
    scale = (amax / qmax).clamp_min(1e-8)
    return torch.round(xf / scale).clamp(-qmax - 1, qmax) * scale


def quant_matmul(
    x: torch.Tensor,
    w: torch.Tensor,
    w_bits: int | None,
    a_bits: int | None,
    w_group: int | None = None,
    a_granularity: ActGranularity = "token",
    w_symmetric: bool = True,
) -> torch.Tensor:
    """``fq(x) @ fq(w)^T``: the output a W{w_bits}A{a_bits} kernel would give, in float."""
    xq = fake_quant_act(x.reshape(-1, x.shape[-1]), a_bits, a_granularity)
    return xq @ fake_quant_weight(w, w_bits, w_group, w_symmetric).T


# ---- SmoothQuant migration -------------------------------------------------------------------


def smooth_scales(
    act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float, eps: float = 1e-5
) -> torch.Tensor:
    """Per-input-channel ``s = amax|x_j|^alpha / amax|W_:j|^(1-alpha)``, fp32 [in].

    Channels that never fire or whose weight column is zero get ``s = 1``: there is nothing to
    balance, and an extreme ``s`` there would only manufacture a new outlier on the other side.
    """
    a = act_absmax.detach().float().to(weight.device)
    wmax = weight.detach().float().abs().amax(dim=0)
    s = a.clamp_min(eps).pow(alpha) / wmax.clamp_min(eps).pow(1.0 - alpha)
    ok = (a > 0) & (wmax > 0) & torch.isfinite(s) & (s > 0)
    return torch.where(ok, s, torch.ones_like(s))


def fold_into_weight(weight: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``W * s`` (columns): the weight that expects the input divided by ``s``."""
    return weight * s.to(weight.dtype)[None, :]


def smooth_input(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``x / s`` along the last dim: what runs in front of the smoothed weight."""
    return x / s.to(x.dtype)


def fold_into_layernorm(
    ln_weight: torch.Tensor, ln_bias: torch.Tensor | None, s: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fold ``1 / s`` into an affine LayerNorm/RMSNorm feeding only smoothed layers."""
    w = ln_weight / s.to(ln_weight.dtype)
    b = None if ln_bias is None else ln_bias / s.to(ln_bias.dtype)
    return w, b


def _as_samples(x: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    xs = [x] if isinstance(x, torch.Tensor) else list(x)
    return [t.reshape(-1, t.shape[-1]).float() for t in xs]


def smoothed_error(
    xs: Sequence[torch.Tensor],
    weight: torch.Tensor,
    s: torch.Tensor | None,
    w_bits: int | None,
    a_bits: int | None,
    w_group: int | None = None,
    a_granularity: ActGranularity = "token",
    rotation: torch.Tensor | None = None,
) -> float:
    """Mean over samples of the relative output MSE of the quantised, balanced matmul.

    Relative per sample so a timestep group with large activations does not drown the others.
    """
    wf = weight.float()
    w_t = fold_into_weight(wf, s) if s is not None else wf
    if rotation is not None:
        w_t = w_t @ rotation
    wq = fake_quant_weight(w_t, w_bits, w_group)
    total = 0.0
    for x in xs:
        ref = x @ wf.T
        xt = smooth_input(x, s) if s is not None else x
        if rotation is not None:
            xt = xt @ rotation
        out = fake_quant_act(xt, a_bits, a_granularity) @ wq.T
        total += float((out - ref).pow(2).mean() / ref.pow(2).mean().clamp_min(1e-20))
    return total / len(xs)


def search_alpha(
    x_sample: torch.Tensor | Sequence[torch.Tensor],
    weight: torch.Tensor,
    w_bits: int | None,
    a_bits: int | None,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    w_group: int | None = None,
    a_granularity: ActGranularity = "token",
    act_absmax: torch.Tensor | None = None,
    rotation: torch.Tensor | None = None,
) -> tuple[float, torch.Tensor]:
    """Choose the migration strength that minimises the quantised matmul's output error.

    Args:
        x_sample: inputs [..., in], or a list of them (e.g. one per timestep group: the error is
            averaged so the one scale must serve every group).
        weight: [out, in].
        w_bits, a_bits: bits of the fake quantisers (None: that side stays float).
        alphas: candidate strengths.
        w_group: weight group size (None: per output channel).
        a_granularity: ``token`` (dynamic per row) or ``tensor``.
        act_absmax: per-channel absmax to build ``s`` from (e.g. observers' envelope over all
            calibration data); defaults to the sample's.
        rotation: an orthogonal ``Q`` applied after the scaling (see :func:`hadamard`).

    Returns:
        ``(alpha, s)`` with ``s`` fp32 [in].
    """
    xs = _as_samples(x_sample)
    if act_absmax is None:
        act_absmax = torch.stack([x.abs().amax(dim=0) for x in xs]).amax(dim=0)
    best: tuple[float, float, torch.Tensor] | None = None
    for a in alphas:
        s = smooth_scales(act_absmax, weight, a)
        err = smoothed_error(xs, weight, s, w_bits, a_bits, w_group, a_granularity, rotation)
        if best is None or err < best[0]:
            best = (err, float(a), s)
    assert best is not None, "search_alpha: alphas must not be empty"
    return best[1], best[2]


# ---- static-dynamic balancing ----------------------------------------------------------------


def hadamard(n: int, seed: int = 0, max_block: int = 1024) -> torch.Tensor:
    """Orthogonal randomised block-Hadamard ``Q`` [n, n] (fp32).

    Blocks are Sylvester Hadamards of the largest power of two dividing ``n`` (capped at
    ``max_block``: 1152 = 9 x 128, 4608 = 9 x 512), with random signs on the rows so a
    structured outlier pattern cannot align with the transform. An odd ``n`` gives a diagonal
    ``+-1``: no mixing, but still orthogonal, so callers need no special case.
    """
    b = 1
    while n % (b * 2) == 0 and b * 2 <= max_block:
        b *= 2
    h = torch.ones(1, 1)
    while h.shape[0] < b:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    h = h / b**0.5
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n,), generator=g).float() * 2 - 1
    return signs[:, None] * torch.block_diag(*([h] * (n // b)))


def balance_static_dynamic(
    x_by_group: Mapping[object, torch.Tensor] | Sequence[torch.Tensor],
    weight: torch.Tensor,
    w_bits: int | None,
    a_bits: int | None,
    w_group: int | None = None,
    a_granularity: ActGranularity = "token",
    rotate: bool = True,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    seed: int = 0,
) -> tuple[float, torch.Tensor, torch.Tensor | None]:
    """Static scale over all timestep groups, then an optional Hadamard rotation.

    The strength is searched jointly on every group's sample, with and without the rotation,
    and the better of the two is kept, so ``rotate=True`` never does worse on the sample than
    scaling alone.

    Returns:
        ``(alpha, s [in], Q [in, in] or None)``: run ``x -> (x / s) @ Q`` in front of the
        weight ``(W * s) @ Q``.
    """
    xs = _as_samples(list(x_by_group.values()) if isinstance(x_by_group, Mapping) else x_by_group)
    envelope = torch.stack([x.abs().amax(dim=0) for x in xs]).amax(dim=0)
    args = (w_bits, a_bits, alphas, w_group, a_granularity, envelope)
    alpha, s = search_alpha(xs, weight, *args)
    if not rotate:
        return alpha, s, None
    q = hadamard(weight.shape[1], seed).to(weight.device)
    alpha_r, s_r = search_alpha(xs, weight, *args, rotation=q)
    err = smoothed_error(xs, weight, s, w_bits, a_bits, w_group, a_granularity)
    err_r = smoothed_error(xs, weight, s_r, w_bits, a_bits, w_group, a_granularity, q)
    return (alpha_r, s_r, q) if err_r < err else (alpha, s, None)
