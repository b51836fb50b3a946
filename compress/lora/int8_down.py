"""A LoRA side branch's down-projection on the int8 input codes of a W8A8 layer.

A dynamic W8A8 layer quantises its input per token (after its smoothing factors) before its
int8 GEMM and keeps those codes for the call. The branch's first product ``x A^T`` ([M, in] x
[in, r], r the rank) can run on the same codes: ``x ~ (xq * s_row) * smooth``, so
``x A^T ~ (xq (A * smooth)^T) * s_row``, with ``A * smooth`` quantised per row to int8 once (and
again only when the adapter's weight or the layer's smoothing changes). The product is then an
int8 GEMM over codes that already exist instead of a 16-bit GEMM over ``x``.

Whether that is faster depends on the CPU: one timing at first use decides
(:func:`int8_faster`); ``DIT_COMPRESS_LORA_DOWN=int8`` or ``=float`` forces it. The branch's
input is then quantised to 8 bits per token as the layer's own input is (the adapter's matrix
per row): the branch's error is of the order of the layer's own activation rounding. Inside
``torch.compile``, under autograd, and on layers that run dequantised (small shapes, see
:mod:`compress.modules.w8a8_dense`) the branch stays in floating point.
"""

from __future__ import annotations

import functools
import os

import torch


def _quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: (codes [r, in], scales [r])."""
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
    return torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8), scale


@functools.cache
def int8_faster() -> bool:
    """Whether torch._int_mm beats a bf16 GEMM for a rank-16 down-projection here (the int8
    form must win by 5%; it needs the int8 input codes, which the base layer makes anyway)."""
    forced = os.environ.get("DIT_COMPRESS_LORA_DOWN", "").strip().lower()
    if forced in ("int8", "float"):
        return forced == "int8"
    from compress.metrics.timing import best_seconds_alternated

    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 1152, generator=g).to(torch.bfloat16)
    a = torch.randn(16, 1152, generator=g).to(torch.bfloat16)
    xq = torch.randint(-127, 128, (256, 1152), generator=g, dtype=torch.int8)
    aq = torch.randint(-127, 128, (16, 1152), generator=g, dtype=torch.int8)
    try:
        t_int, t_bf = best_seconds_alternated(
            [lambda: torch._int_mm(xq, aq.t()), lambda: torch.nn.functional.linear(x, a)],
            rounds=5, repeats=20)
    except RuntimeError:  # no int8 GEMM for these shapes on this build
        return False
    return t_int < 0.95 * t_bf


def usable(base, x: torch.Tensor) -> bool:
    """Whether ``base``'s call on ``x`` quantises ``x`` per token (dynamic W8A8, int8 GEMM
    path, CPU, no autograd) so that the branch can share its codes."""
    from compress.modules import w8a8_dense
    from compress.modules.w8a8 import W8A8Linear

    return (isinstance(base, W8A8Linear) and base.act == "dynamic" and x.device.type == "cpu"
            and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and x.reshape(-1, x.shape[-1]).shape[0] > 16
            and not w8a8_dense.use_dense(base, x) and int8_faster())


def down(host, name: str, base, x: torch.Tensor | None, dtype: torch.dtype,
         codes: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``x A^T`` for adapter ``name`` of LoRA layer ``host`` from ``base``'s int8 codes of x
    ([M, r] in ``dtype``); ``codes`` (int8 [M, in], per-token scales [M, 1]) when x exists
    only as those codes."""
    from compress.modules import weight_cache

    a = host.lora_A[name]
    sources = (a.weight, base.smooth)
    cache = host.__dict__.setdefault("_int8_down", {})
    hit = cache.get(name)
    if hit is None or not weight_cache.unchanged(hit[0], sources):
        w = a.weight.detach().float()
        if base.smooth is not None:
            w = w * base.smooth.float()[None, :]
        qa, scale = _quantize_rows(w)
        hit = cache[name] = (weight_cache.stamp(sources), qa, scale)
    _, qa, scale = hit
    xq, x_scale = base.quantize_input(x) if codes is None else codes
    acc = torch._int_mm(xq, qa.t())
    h = acc.float() * x_scale * scale
    if a.bias is not None:
        h = h + a.bias.float()
    return h.to(dtype)
