"""Int4Linear: weight-only int4 (grouped) that keeps no full-precision weight.

Stored state (plain tensors, safetensors-friendly): ``qweight`` uint8 [out, in_padded/2] (two
codes per byte, see :func:`compress.quant.kernels.pack_int4`), ``scale`` fp16 [out, groups],
``zero`` uint8 [out, groups] for asymmetric grids, ``bias`` fp32 [out].

The forward unpacks the codes into a transient weight in the input's dtype with one fused loop
and runs the dense GEMM (AMX bf16 on this CPU); the transient dies with the call. At the
PixArt shapes (hundreds of tokens a call) this beats torch's int4 kernels: at 512 rows
``_weight_int4pack_mm_for_cpu`` (built for a handful of rows) ran 4-8x slower than the bf16
GEMM, while the unpacking costs about what copying a bf16 weight does (~10-15% of the GEMM).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from compress.modules import weight_cache
from compress.quant import kernels, qtensor


class Int4Linear(nn.Module):
    """Drop-in ``nn.Linear`` with int4 weights in groups of ``group_size`` inputs."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        group_size: int = 128,
        symmetric: bool = True,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if group_size % 2:
            raise ValueError(f"group_size must be even, got {group_size}")
        self.in_features = in_features
        self.out_features = out_features
        self.group_size = group_size
        self.symmetric = symmetric
        g = -(-in_features // group_size)
        self.n_groups = g
        kw: dict[str, Any] = {"device": device}
        self.register_buffer(
            "qweight", torch.empty(out_features, g * group_size // 2, dtype=torch.uint8, **kw)
        )
        self.register_buffer("scale", torch.empty(out_features, g, dtype=torch.float16, **kw))
        self.register_buffer(
            "zero", None if symmetric else torch.empty(out_features, g, dtype=torch.uint8, **kw)
        )
        self.register_buffer(
            "bias", torch.empty(out_features, dtype=torch.float32, **kw) if bias else None
        )

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, group_size: int = 128, symmetric: bool = True
    ) -> Int4Linear:
        """Round-to-nearest int4 on the same grid as :func:`compress.quant.qtensor.quantize`."""
        w = linear.weight.detach().float()
        in_f = w.shape[1]
        pad = (-in_f) % group_size
        # Pad with zeros so every group is full: the padded inputs meet zero activations
        # anyway, and full groups keep the unpacking loop free of ragged edges.
        wp = F.pad(w, (0, pad)) if pad else w
        codes, scale, zero = qtensor.quantize(wp, 4, group_size, symmetric)
        bias = linear.bias.detach() if linear.bias is not None else None
        return cls.from_codes(codes, scale, zero, bias, in_f, group_size)

    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor | None,
        bias: torch.Tensor | None,
        in_features: int,
        group_size: int,
    ) -> Int4Linear:
        """From unsigned codes [out, groups*group_size] (< 16; symmetric ones offset by 8)."""
        out_f = codes.shape[0]
        m = cls(in_features, out_f, bias is not None, group_size, zero is None, codes.device)
        m.qweight.copy_(kernels.pack_int4(codes.to(torch.uint8), group_size))
        m.scale.copy_(scale.to(torch.float16))
        if zero is not None:
            m.zero.copy_(zero.to(torch.uint8))
        if bias is not None:
            m.bias.copy_(bias.float())
        return m

    def _apply(self, fn: Any, recurse: bool = True) -> nn.Module:
        # model.to(torch.bfloat16) must move the fp16 scales and fp32 bias, not re-round them.
        for name, t in list(self._buffers.items()):
            if t is not None:
                moved = fn(t)
                self._buffers[name] = moved if moved.dtype == t.dtype else t.to(moved.device)
        return self

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        # fp32 scales in: the fused loop then has one float type (fp16 next to bf16 made
        # inductor warn); the conversion is per group, ~1/64 of the weight.
        w = kernels.dequantize_int4(
            self.qweight, self.scale.float(), self.zero, self.group_size, dtype
        )
        return w[:, : self.in_features] if w.shape[1] != self.in_features else w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16, torch.float32) else None
        if dtype is None:
            raise TypeError(f"Int4Linear needs a floating-point input, got {x.dtype}")
        return weight_cache.linear(self, x, self.bias, self.dequantized_weight)

    @torch.no_grad()
    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 matmul with the lead's reference dequantiser (for tests)."""
        codes = kernels.unpack_int4(self.qweight, self.group_size)
        w = qtensor.dequantize(codes, self.scale, self.zero, 4, torch.float32)
        w = w[:, : self.in_features]
        y = x.float() @ w.t()
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        sym = "" if self.symmetric else ", asymmetric"
        return (
            f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, "
            f"group_size={self.group_size}{sym}"
        )
