"""Weight-only quantised layers: build one from a weight or from integer codes, and rebuild an
empty one from its manifest meta (``restore``).

A weight matrix ``[out, fan_in]`` (a Linear's weight, or a conv's flattened) is held by:

- ``Int4Linear`` (kind "int4") for 4-bit codes whose groups tile the fan-in exactly with an even
  size (per channel: an even fan-in): the fast unpacking path;
- ``FP8Linear`` (kind "fp8") for float8 e4m3 weights;
- ``QLinear`` (kind "weight_only") for everything else (2..8 bits, any grouping).

A Conv2d becomes a ``QConv2d`` (kind "conv") around such a matrix (its meta's "matrix" key).
Int4Linear and QLinear hold the same codes on the same grid, so they dequantise to the same
weights; only the packing differs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compress.modules.fp8_linear import FP8Linear
from compress.modules.int4 import Int4Linear
from compress.modules.qconv import QConv2d
from compress.modules.qlinear import QLinear
from compress.quant import kernels, qtensor

FP8 = "fp8_e4m3"


def int4_group(in_features: int, group_size: int | None) -> int | None:
    """Int4Linear's group size for exactly qtensor's grid, or None when it cannot hold it."""
    g = qtensor.n_groups(in_features, group_size)
    gs = -(-in_features // g)
    return gs if gs * g == in_features and gs % 2 == 0 else None


def matrix_kind(fmt: str, bits: int, in_features: int, group_size: int | None) -> str:
    if fmt == FP8:
        return "fp8"
    if bits == 4 and int4_group(in_features, group_size) is not None:
        return "int4"
    return "weight_only"


def empty_matrix(
    kind: str, in_features: int, out_features: int, bias: bool, bits: int,
    group_size: int | None, symmetric: bool, device: torch.device | str | None = None,
) -> nn.Module:
    if kind == "fp8":
        return FP8Linear(in_features, out_features, bias, device=device)
    if kind == "int4":
        return Int4Linear(in_features, out_features, bias, int4_group(in_features, group_size),
                          symmetric, device=device)
    if kind == "weight_only":
        return QLinear(in_features, out_features, bias, bits, group_size, symmetric, device=device)
    raise ValueError(f"unknown weight-only kind {kind!r}")


@torch.no_grad()
def matrix_from_codes(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int,
    group_size: int | None, bias: torch.Tensor | None = None,
) -> tuple[nn.Module, str]:
    """(module, kind) holding qtensor codes uint8 [out, in] with their scales (and zeros)."""
    out_f, in_f = codes.shape
    kind = matrix_kind("int", bits, in_f, group_size)
    m = empty_matrix(kind, in_f, out_f, bias is not None, bits, group_size, zero is None,
                     device=codes.device)
    if kind == "int4":
        m.qweight.copy_(kernels.pack_int4(codes.to(torch.uint8), m.group_size))
    else:
        m.qweight.copy_(qtensor.pack(codes, bits))
    m.scale.copy_(scale.to(torch.float16))
    if zero is not None:
        m.zero.copy_(zero)
    if bias is not None:
        m.bias.data.copy_(bias.detach().float())
    return m, kind


@torch.no_grad()
def quantize_matrix(
    w: torch.Tensor, bias: torch.Tensor | None, fmt: str, bits: int, group_size: int | None,
    symmetric: bool,
) -> tuple[nn.Module, str]:
    """Round-to-nearest: (module, kind) for a weight [out, fan_in]."""
    if fmt == FP8:
        return FP8Linear.from_weight(w, bias), "fp8"
    codes, scale, zero = qtensor.quantize(w, bits, group_size, symmetric)
    return matrix_from_codes(codes, scale, zero, bits, group_size, bias)


def fan_in(mod: nn.Module) -> int:
    return mod.in_features if isinstance(mod, nn.Linear) else mod.weight[0].numel()


def out_features(mod: nn.Module) -> int:
    return mod.out_features if isinstance(mod, nn.Linear) else mod.out_channels


def empty_layer(meta: dict[str, Any], device: torch.device | str | None = "meta") -> nn.Module:
    """An unfilled module for a layer's manifest meta (kinds weight_only, int4, fp8, conv)."""
    kind = meta.get("kind", "weight_only")
    fmt_args = (meta["bits"], meta["group_size"], meta["symmetric"])
    if kind != "conv":
        return empty_matrix(kind, meta["in"], meta["out"], meta["bias"], *fmt_args, device=device)
    wq = empty_matrix(meta["matrix"], meta["in"], meta["out"], False, *fmt_args, device=device)
    pad = meta["padding"]
    return QConv2d(
        wq, meta["in_channels"], meta["out"], tuple(meta["kernel_size"]), tuple(meta["stride"]),
        pad if isinstance(pad, str) else tuple(pad), tuple(meta["dilation"]), meta["groups"],
        meta["bias"], meta["padding_mode"], device=device,
    )
