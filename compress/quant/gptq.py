"""GPTQ: quantise a weight column by column, pushing each column's error onto the columns not
yet quantised through the inverse Hessian of the layer's inputs (Frantar et al., 2022).

The result is on exactly the grid of :func:`compress.quant.qtensor.quantize` (unsigned codes,
fp16 scales rounded before the codes are chosen, the same group layout), so
``qtensor.dequantize`` and ``qtensor.pack`` apply unchanged and QLinear can hold it.
"""

from __future__ import annotations

import torch

from compress.quant import qtensor


def _grid_params(
    w: torch.Tensor, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    # Borrow qtensor's own scale rule on the slice so the two can never drift apart.
    _, scale, zero = qtensor.quantize(w, bits, None, symmetric)
    return scale[:, 0], (zero[:, 0] if zero is not None else None)


def _quant_column(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One column onto its grid: (uint8 codes, dequantised values)."""
    s = scale.float()
    if zero is None:
        half = 2 ** (bits - 1)
        q = torch.round(w / s).clamp(-half, half - 1)
        return (q + half).to(torch.uint8), q * s
    z = zero.float()
    c = (torch.round(w / s) + z).clamp(0, 2**bits - 1)
    return c.to(torch.uint8), (c - z) * s


def _inverse_hessian_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``(H + damp * mean(diag H) * I)^-1`` (so ``H^-1 = U^T U``).

    With ``J`` the index flip, ``J H J = L L^T`` gives ``H^-1 = (J L^-1 J)^T (J L^-1 J)`` and
    ``J L^-1 J`` is upper triangular: one factorisation and one triangular inverse, instead of
    inverting ``H`` and factorising again. fp32 first, fp64 if that fails; the damping is raised
    tenfold on failure, since Hessians of layers fed by few tokens are often singular and one
    layer should not stop a whole run.
    """
    n = h.shape[0]
    mean_diag = max(float(torch.diag(h).mean()), 1e-12)
    for attempt in range(6):
        lam = damp * (10**attempt) * mean_diag
        for dtype in (torch.float32, torch.float64):
            hd = h.to(dtype) + lam * torch.eye(n, dtype=dtype, device=h.device)
            chol, info = torch.linalg.cholesky_ex(hd.flip(0, 1))
            if int(info) != 0:
                continue
            eye = torch.eye(n, dtype=dtype, device=h.device)
            u = torch.linalg.solve_triangular(chol, eye, upper=False).flip(0, 1)
            if bool(torch.isfinite(u).all()) and bool((torch.diag(u) > 0).all()):
                return u.float()
    raise RuntimeError("gptq: Hessian is not positive definite even with heavy damping")


@torch.no_grad()
def gptq_quantize(
    w: torch.Tensor,
    h: torch.Tensor,
    bits: int,
    group_size: int | None = None,
    symmetric: bool = True,
    damp: float = 0.01,
    block: int = 128,
    act_order: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Quantise ``w`` [out, in] minimising ``||X w^T - X w_q^T||`` for inputs with ``X^T X = h``.

    Args:
        w: weight [out, in] (a conv weight flattened to [out, fan_in]).
        h: ``sum x^T x`` over calibration rows, [in, in] (any positive scale).
        bits: 2..8.
        group_size: inputs per scale as in ``qtensor.quantize``; None for one scale per row.
        symmetric: symmetric codes (no zero point).
        damp: diagonal damping as a fraction of the mean diagonal of ``h``.
        block: columns per lazy update; raised to a multiple of the group so a group never
            straddles two blocks and its scale sees every earlier correction.
        act_order: process columns by decreasing ``diag(h)``. Group scales are then fixed from
            the original weight before any update ("static groups"), which keeps the
            contiguous group layout that ``qtensor`` and the packed format assume.

    Returns:
        ``(codes uint8 [out, in], scale fp16 [out, g], zero uint8 [out, g] or None)``, readable
        by ``qtensor.dequantize(codes, scale, zero, bits)``.
    """
    out_f, in_f = w.shape
    if h.shape != (in_f, in_f):
        raise ValueError(
            f"gptq: Hessian shape {tuple(h.shape)} does not match weight {tuple(w.shape)}"
        )
    dev = w.device
    wf = w.detach().float().clone()
    hf = h.detach().to(device=dev, dtype=torch.float64).clone()  # exact sums for the dead test
    # Inputs that were always zero carry no information: pin them so H stays invertible.
    dead = torch.diag(hf) == 0
    hf[dead, dead] = 1.0
    wf[:, dead] = 0.0

    g = qtensor.n_groups(in_f, group_size)
    gs = -(-in_f // g)
    scale = torch.empty(out_f, g, dtype=torch.float16, device=dev)
    zero = None if symmetric else torch.empty(out_f, g, dtype=torch.uint8, device=dev)

    def set_group(k: int, cols: torch.Tensor) -> None:
        s, z = _grid_params(cols, bits, symmetric)
        scale[:, k] = s
        if zero is not None:
            zero[:, k] = z

    static_groups = g == 1 or act_order
    if static_groups:
        for k in range(g):
            set_group(k, wf[:, k * gs : min((k + 1) * gs, in_f)])

    if act_order:
        perm = torch.argsort(torch.diag(hf), descending=True)
    else:
        perm = torch.arange(in_f, device=dev)
    wf = wf[:, perm]
    hf = hf[perm][:, perm]
    u = _inverse_hessian_factor(hf, damp)
    del hf

    if not static_groups:
        block = max(gs, (block // gs) * gs)
    group_of = (perm // gs).tolist()
    perm_l = perm.tolist()
    codes = torch.empty(out_f, in_f, dtype=torch.uint8, device=dev)

    for i1 in range(0, in_f, block):
        i2 = min(i1 + block, in_f)
        w1 = wf[:, i1:i2].clone()
        err1 = torch.empty_like(w1)
        u1 = u[i1:i2, i1:i2]
        for j in range(i2 - i1):
            col = i1 + j
            k = group_of[col]
            if not static_groups and perm_l[col] % gs == 0:
                # w1 already holds every correction from earlier columns, so the group's
                # range is measured on the weights that will actually be rounded.
                set_group(k, w1[:, j : min(j + gs, i2 - i1)])
            c, wq = _quant_column(
                w1[:, j], scale[:, k], zero[:, k] if zero is not None else None, bits
            )
            codes[:, col] = c
            e = (w1[:, j] - wq) / u1[j, j]
            w1[:, j:] -= e[:, None] * u1[j, j:][None, :]
            err1[:, j] = e
        if i2 < in_f:
            wf[:, i2:] -= err1 @ u[i1:i2, i2:]

    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(in_f, device=dev)
    return codes[:, inv].contiguous(), scale, zero


def output_error(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """``||x w^T - x w_hat^T||_F / ||x w^T||_F``: what GPTQ minimises, relative."""
    ref = x.float() @ w.float().T
    return float((ref - x.float() @ w_hat.float().T).norm() / ref.norm().clamp_min(1e-12))
