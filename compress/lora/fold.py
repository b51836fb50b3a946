"""Fold a weight change (a LoRA's B @ A) into a compressed layer by re-quantising it.

Each layer type is re-quantised in its own format and settings: the stored weight is
dequantised, the change added, and the sum quantised again as the layer's own pass would round
it (round to nearest on the layer's grid; VQ layers pick the nearest codeword of their own
codebooks; W8A8 layers keep their smoothing and activation scales). Calibration-time
optimisation (GPTQ's error feedback, codebook fine-tuning) is not repeated, so the folded layer
is within one rounding step of the exact sum, not bit-equal to compressing the fused model.
"""

from __future__ import annotations

import torch
from torch import nn

from compress.quant import qtensor


def _set(dst: nn.Module, **tensors: torch.Tensor) -> None:
    from compress.modules import weight_cache

    with torch.no_grad():
        for name, t in tensors.items():
            getattr(dst, name).copy_(t)
    weight_cache.forget(dst)  # under inference_mode the copies bump no version counter


def _qlinear(m, w: torch.Tensor) -> None:
    codes, scale, zero = qtensor.quantize(w, m.bits, m.group_size, m.symmetric)
    packed = qtensor.pack(codes, m.bits) if m.bits < 8 else codes
    _set(m, qweight=packed, scale=scale, **({"zero": zero} if zero is not None else {}))


def _int4(m, w: torch.Tensor) -> None:
    from compress.modules.int4 import Int4Linear

    lin = nn.Linear(m.in_features, m.out_features, bias=False)
    lin.weight.data = w
    new = Int4Linear.from_linear(lin, m.group_size, m.symmetric)
    _set(m, qweight=new.qweight, scale=new.scale, **({"zero": new.zero} if new.zero is not None
                                                     else {}))


def _fp8(m, w: torch.Tensor) -> None:
    q, scale = qtensor.quantize_fp8(w)
    _set(m, qweight=q, scale=scale)


def _w8a8(m, w: torch.Tensor) -> None:
    from compress.modules.w4a8 import W4A8Linear
    from compress.quant.kernels import QMAX

    ws = w * m.smooth.float()[None, :] if m.smooth is not None else w
    if isinstance(m, W4A8Linear):
        codes, scale, _ = qtensor.quantize(ws, 4, None, True)
        _set(m, qweight=qtensor.pack(codes, 4), weight_scale=scale.float().reshape(-1))
        m._unpack()
    else:
        scale = (ws.abs().amax(dim=1) / QMAX).clamp_min(1e-12)
        codes = torch.round(ws / scale[:, None]).clamp(-QMAX, QMAX).to(torch.int8)
        _set(m, weight=codes, weight_scale=scale)
    m.release()


def _vq(m, w: torch.Tensor) -> None:
    from compress.modules.vq_linear import group_of_rows

    books = m.codebooks.float()
    sub = w.reshape(m.out_features, -1, m.dim)
    gid = (group_of_rows(m.out_features, m.rows) if m.rows is not None
           else torch.zeros(m.out_features, dtype=torch.long))
    idx = torch.empty(sub.shape[:2], dtype=torch.long)
    for g in range(books.shape[0]):
        rows = (gid == g).nonzero().flatten()
        if len(rows):
            d = torch.cdist(sub[rows].reshape(-1, m.dim), books[g])
            idx[rows] = d.argmin(dim=1).view(len(rows), -1)
    codes = idx.to(torch.uint8)
    _set(m, indices=codes if m.bits == 8 else qtensor.pack(codes, m.bits))
    m._unpacked = None


def _lowrank(m, w: torch.Tensor) -> None:
    # W = (residual + l1 @ l2) / smooth in the input basis: the change goes into the residual
    ws = w * m.smooth[None, :] if m.smooth is not None else w
    resid = ws - m.l1.float() @ m.l2.float()
    codes, scale, _ = qtensor.quantize(resid, m.w_bits, m.group_size, True)
    _set(m, qweight=qtensor.pack(codes, m.w_bits) if m.w_bits < 8 else codes, scale=scale)


def effective_weight(m: nn.Module) -> torch.Tensor:
    """The layer's weight as the float matrix it multiplies inputs by (input basis)."""
    from compress.modules.lowrank_linear import LowRankQLinear

    if isinstance(m, LowRankQLinear):
        w = m.residual_weight() + m.l1.float() @ m.l2.float()
        return w / m.smooth[None, :] if m.smooth is not None else w
    return m.dequantized_weight(torch.float32)


def folders() -> dict[type, callable]:
    from compress.modules.fp8_linear import FP8Linear
    from compress.modules.int4 import Int4Linear
    from compress.modules.lowrank_linear import LowRankQLinear
    from compress.modules.qlinear import QLinear
    from compress.modules.vq_linear import VQLinear
    from compress.modules.w8a8 import W8A8Linear

    return {QLinear: _qlinear, Int4Linear: _int4, FP8Linear: _fp8, W8A8Linear: _w8a8,
            VQLinear: _vq, LowRankQLinear: _lowrank}


def compressed_linear_types() -> tuple[type, ...]:
    """The runtime layers that stand where an nn.Linear was (the LoRA side branch's hosts)."""
    return tuple(folders())


@torch.no_grad()
def fold_(m: nn.Module, delta: torch.Tensor) -> None:
    """Re-quantise ``m`` in place so that it stores (its weight + ``delta``) in its own format."""
    for cls, fn in folders().items():
        if isinstance(m, cls):
            w = effective_weight(m)
            fn(m, w + delta.float().to(w.device))
            return
    raise TypeError(f"{type(m).__name__}: not a compressed linear layer")
