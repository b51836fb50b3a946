"""SVDQuant-style low-rank branch: ``W = L1 @ L2 + R``, keep ``L1, L2`` in 16 bits, quantise
only the residual ``R``.

Smoothing first (``x -> x / s``, ``W -> W * s``) moves the activation outliers into a few weight
columns; those columns are nearly rank-deficient structure the top singular vectors pick up, so
the residual is small and flat enough for 4-bit weights, and its input ``x / s`` flat enough for
4-bit activations. The branch runs on the unquantised smoothed input:

    y = (x / s) @ L2^T @ L1^T  +  fq(x / s) @ fq(R)^T  (+ bias)

Costs ``rank * (in + out)`` 16-bit parameters a layer: 16 * 512 / (256 * 256) = 1/8 of the
layer's parameter count at rank 16 on 256 x 256, 3% on 1152 x 1152 at rank 32.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from compress.quant import qtensor
from compress.quant.smooth import (
    ActGranularity,
    fake_quant_act,
    fold_into_weight,
    smooth_input,
    smooth_scales,
)

# (residual [out, in], smoothing s [in] or None) -> (codes, scale, zero) on qtensor's grid; gets
# s so a GPTQ closure can rescale its Hessian to the smoothed inputs: H_s = H / (s s^T).
ResidualQuantizer = Callable[
    [torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]
]
DEFAULT_ALPHAS = (0.0, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
_EXACT_SVD_MAX = 512  # above this a seeded randomised SVD is far faster and as good at top-r


def _top_svd(m: torch.Tensor, rank: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Top-``rank`` singular triplets, deterministic (a seeded range finder on large inputs)."""
    if min(m.shape) <= _EXACT_SVD_MAX or rank * 4 >= min(m.shape):
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        return u[:, :rank], s[:rank], vh[:rank]
    g = torch.Generator(device="cpu").manual_seed(seed)
    k = rank + 16
    q = torch.randn(m.shape[1], k, generator=g).to(m)
    q, _ = torch.linalg.qr(m @ q)
    for _ in range(4):  # power iterations sharpen a slowly decaying spectrum
        q, _ = torch.linalg.qr(m.T @ q)
        q, _ = torch.linalg.qr(m @ q)
    ub, s, vh = torch.linalg.svd(q.T @ m, full_matrices=False)
    return (q @ ub)[:, :rank], s[:rank], vh[:rank]


@torch.no_grad()
def lowrank_split(
    w: torch.Tensor, rank: int, x_sample: torch.Tensor | None = None, damp: float = 1e-4
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split ``w`` [out, in] into ``(L1 [out, r], L2 [r, in], R)`` with ``w = L1 @ L2 + R``.

    Without ``x_sample`` the branch is the best rank-``r`` fit of ``w`` itself (smallest
    ``||R||``), which is SVDQuant's choice and the right one after smoothing. With ``x_sample``
    [..., in] it is the best fit of the *output* on those inputs (smallest ``||x R^T||``, via
    the SVD of ``w C`` with ``C C^T = x^T x / n``), which keeps the directions the inputs excite
    most in the branch; it helps most when the input was not smoothed.
    """
    wf = w.detach().float()
    if rank <= 0:
        return wf.new_zeros(wf.shape[0], 0), wf.new_zeros(0, wf.shape[1]), wf.clone()
    rank = min(rank, *wf.shape)
    if x_sample is None:
        u, s, vh = _top_svd(wf, rank)
        l1, l2 = u * s, vh
    else:
        x = x_sample.detach().reshape(-1, wf.shape[1]).float()
        cov = (x.T @ x / x.shape[0]).double()
        cov += damp * float(cov.diagonal().mean().clamp_min(1e-12)) * torch.eye(
            cov.shape[0], dtype=cov.dtype, device=cov.device
        )
        c = torch.linalg.cholesky(cov)
        u, s, vh = _top_svd((wf.double() @ c), rank)
        # L2 = V_r^T C^-1, computed as a triangular solve rather than an explicit inverse
        l2 = torch.linalg.solve_triangular(c, vh, upper=False, left=False)
        l1, l2 = (u * s).float(), l2.float()
    return l1, l2, wf - l1 @ l2


@dataclass
class LowRankQuant:
    """A smoothed, low-rank-plus-quantised-residual layer (no bias: that stays the layer's)."""

    s: torch.Tensor | None  # [in] smoothing; the input is divided by it
    l1: torch.Tensor  # [out, r]
    l2: torch.Tensor  # [r, in]
    codes: torch.Tensor  # uint8 [out, in] on qtensor's grid
    scale: torch.Tensor  # fp16 [out, g]
    zero: torch.Tensor | None
    bits: int
    alpha: float | None = None

    def residual(self) -> torch.Tensor:
        return qtensor.dequantize(self.codes, self.scale, self.zero, self.bits)

    def extra_params(self) -> int:
        """16-bit parameters the branch (and ``s``) add on top of the quantised residual."""
        return self.l1.numel() + self.l2.numel() + (0 if self.s is None else self.s.numel())


def lowrank_forward(
    x: torch.Tensor, lq: LowRankQuant, a_bits: int | None, a_granularity: ActGranularity = "token"
) -> torch.Tensor:
    """Reference (fake-quantised) forward of a :class:`LowRankQuant` layer on x [..., in]."""
    xf = x.reshape(-1, x.shape[-1]).float()
    xs = smooth_input(xf, lq.s) if lq.s is not None else xf
    branch = (xs @ lq.l2.T) @ lq.l1.T
    main = fake_quant_act(xs, a_bits, a_granularity) @ lq.residual().T
    return (branch + main).reshape(*x.shape[:-1], -1)


@torch.no_grad()
def svdquant(
    w: torch.Tensor,
    x_sample: torch.Tensor | Sequence[torch.Tensor],
    rank: int,
    w_bits: int,
    a_bits: int | None,
    w_group: int | None = 64,
    symmetric: bool = True,
    a_granularity: ActGranularity = "token",
    alphas: Sequence[float | None] = DEFAULT_ALPHAS,
    act_absmax: torch.Tensor | None = None,
    quantize_residual: ResidualQuantizer | None = None,
) -> LowRankQuant:
    """Smooth, split and quantise one layer, choosing the smoothing strength by output error.

    Args:
        w: weight [out, in].
        x_sample: calibration inputs [..., in] (or a list, e.g. one per timestep group).
        rank: low-rank branch rank.
        w_bits, w_group, symmetric: the residual's integer format (as ``qtensor.quantize``).
        a_bits, a_granularity: the activation quantiser the residual will see.
        alphas: smoothing strengths to try; ``None`` in the list means no smoothing.
        act_absmax: per-channel input absmax for the scales (default: the sample's).
        quantize_residual: ``(R, s) -> (codes, scale, zero)`` on qtensor's grid, e.g. GPTQ with
            the Hessian rescaled to the smoothed inputs; default round-to-nearest.
    """
    xs = [t.reshape(-1, w.shape[1]).float() for t in
          ([x_sample] if isinstance(x_sample, torch.Tensor) else x_sample)]
    if act_absmax is None:
        act_absmax = torch.stack([x.abs().amax(dim=0) for x in xs]).amax(dim=0)
    wf = w.detach().float()
    refs = [x @ wf.T for x in xs]

    def quant(
        r: torch.Tensor, s: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if quantize_residual is not None:
            return quantize_residual(r, s)
        return qtensor.quantize(r, w_bits, w_group, symmetric)

    best: tuple[float, LowRankQuant] | None = None
    for a in alphas:
        s = None if a is None else smooth_scales(act_absmax, wf, a)
        ws = wf if s is None else fold_into_weight(wf, s)
        l1, l2, r = lowrank_split(ws, rank)
        lq = LowRankQuant(s, l1, l2, *quant(r, s), bits=w_bits, alpha=a)
        err = sum(
            float((lowrank_forward(x, lq, a_bits, a_granularity) - y).pow(2).mean()
                  / y.pow(2).mean().clamp_min(1e-20))
            for x, y in zip(xs, refs, strict=True)
        )
        if best is None or err < best[0]:
            best = (err, lq)
    assert best is not None, "svdquant: alphas must not be empty"
    return best[1]
