"""Integer weight formats: round-to-nearest quantisation, dequantisation and dense bit packing.

Weights are quantised along the input dimension, per output channel (one scale per row) or per
group of ``group_size`` consecutive inputs. Codes are stored unsigned (symmetric codes are
offset by 2**(bits-1)) and packed densely: 8 codes of ``bits`` bits fill ``bits`` bytes, so a
3-bit layer really stores 3 bits a weight.
"""

from __future__ import annotations

import torch


def n_groups(in_features: int, group_size: int | None) -> int:
    if group_size is None or group_size >= in_features:
        return 1
    return -(-in_features // group_size)


def quantize(
    w: torch.Tensor, bits: int, group_size: int | None = None, symmetric: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Round-to-nearest. Returns (codes uint8 [out, in], scale fp16 [out, g], zero uint8 or None).

    Scales are rounded to fp16 *before* the codes are computed, so dequantisation with the
    stored scale is exactly the grid the codes were chosen on.
    """
    out_f, in_f = w.shape
    g = n_groups(in_f, group_size)
    gs = -(-in_f // g)
    pad = g * gs - in_f
    wf = w.detach().float()
    if pad:
        wf = torch.nn.functional.pad(wf, (0, pad))
    wg = wf.view(out_f, g, gs)
    levels = 2**bits - 1
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = (wg.abs().amax(dim=2) / qmax).clamp_min(1e-8).half().float()
        codes = torch.round(wg / scale[..., None]).clamp(-qmax - 1, qmax) + 2 ** (bits - 1)
        zero = None
    else:
        lo = wg.amin(dim=2).clamp(max=0)
        hi = wg.amax(dim=2).clamp(min=0)
        scale = ((hi - lo) / levels).clamp_min(1e-8).half().float()
        zero = torch.round(-lo / scale).clamp(0, levels)
        codes = (torch.round(wg / scale[..., None]) + zero[..., None]).clamp(0, levels)
        zero = zero.to(torch.uint8)
    codes = codes.view(out_f, g * gs)[:, :in_f].to(torch.uint8)
    return codes, scale.half(), zero


def dequantize(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    bits: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """codes uint8 [out, in] -> weights [out, in] in ``dtype``."""
    out_f, in_f = codes.shape
    g = scale.shape[1]
    gs = -(-in_f // g)
    pad = g * gs - in_f
    c = codes.to(torch.int16)
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    c = c.view(out_f, g, gs)
    off = zero.to(torch.int16)[..., None] if zero is not None else 2 ** (bits - 1)
    w = (c - off).to(torch.float32) * scale.float()[..., None]
    return w.view(out_f, g * gs)[:, :in_f].to(dtype)


def packed_cols(in_features: int, bits: int) -> int:
    return -(-in_features // 8) * bits


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [rows, n] (each < 2**bits) -> uint8 [rows, ceil(n/8)*bits]."""
    if bits == 8:
        return codes.contiguous()
    rows, n = codes.shape
    pad = (-n) % 8
    c = torch.nn.functional.pad(codes, (0, pad)).to(torch.int64).view(rows, -1, 8)
    shifts = torch.arange(8, dtype=torch.int64, device=codes.device) * bits
    word = (c << shifts).sum(dim=2)  # 8*bits <= 56 bits: fits int64 without the sign bit
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=codes.device) * 8
    out = (word[..., None] >> byte_shifts) & 0xFF
    return out.to(torch.uint8).view(rows, -1)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack`: uint8 [rows, ceil(n/8)*bits] -> uint8 codes [rows, n]."""
    if bits == 8:
        return packed
    rows = packed.shape[0]
    b = packed.to(torch.int64).view(rows, -1, bits)
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=packed.device) * 8
    word = (b << byte_shifts).sum(dim=2)
    shifts = torch.arange(8, dtype=torch.int64, device=packed.device) * bits
    codes = (word[..., None] >> shifts) & (2**bits - 1)
    return codes.to(torch.uint8).view(rows, -1)[:, :n]


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantisation-noise ratio in dB."""
    ref = ref.detach().float()
    noise = (ref - approx.detach().float()).pow(2).mean()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(ref.pow(2).mean() / noise))


# ---- fp8 (e4m3) weights ----------------------------------------------------------------------

FP8_E4M3_MAX = 448.0  # largest finite float8_e4m3fn


def fp8_available() -> bool:
    """Whether this torch has the float8_e4m3fn dtype (torch >= 2.1)."""
    return hasattr(torch, "float8_e4m3fn")


def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] -> (float8_e4m3fn [out, in], fp32 scale [out]); each row's absmax maps to 448.

    The scale stays fp32: weights of ~1e-3 give scales deep in fp16's subnormal range.
    """
    wf = w.detach().float()
    scale = (wf.abs().amax(dim=1) / FP8_E4M3_MAX).clamp_min(1e-12)
    # e4m3fn has no infinity: clamp so rounding at the top edge cannot overflow to NaN.
    q = (wf / scale[:, None]).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale


def dequantize_fp8(
    q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Inverse of :func:`quantize_fp8`, computed in fp32 and rounded once to ``dtype``."""
    return (q.float() * scale.float()[:, None]).to(dtype)
