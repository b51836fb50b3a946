"""FP8Linear: a drop-in nn.Linear whose weight is stored as float8 (e4m3) with one fp32 scale per
output channel (the channel's absmax maps to 448, e4m3's largest finite value).

Stored state (safetensors holds F8_E4M3 natively): ``qweight`` float8_e4m3fn [out, in],
``scale`` fp32 [out], ``bias`` fp32 [out]. The forward dequantises into the input's dtype (in
fp32, rounded once) and runs the dense GEMM; no full-precision copy is kept.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from compress.modules import weight_cache
from compress.quant import qtensor


class FP8Linear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if not qtensor.fp8_available():
            raise RuntimeError(f"torch {torch.__version__} has no float8_e4m3fn (needs >= 2.1)")
        self.in_features = in_features
        self.out_features = out_features
        kw: dict[str, Any] = {"device": device}
        self.register_buffer(
            "qweight", torch.empty(out_features, in_features, dtype=torch.float8_e4m3fn, **kw)
        )
        self.register_buffer("scale", torch.empty(out_features, dtype=torch.float32, **kw))
        self.register_buffer(
            "bias", torch.empty(out_features, dtype=torch.float32, **kw) if bias else None
        )

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> FP8Linear:
        """From a weight [out, in] (a conv weight flattened) and an optional bias."""
        out_f, in_f = weight.shape
        m = cls(in_f, out_f, bias is not None, device=weight.device)
        q, scale = qtensor.quantize_fp8(weight)
        m.qweight.copy_(q)
        m.scale.copy_(scale)
        if bias is not None:
            m.bias.copy_(bias.detach().float())
        return m

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> FP8Linear:
        return cls.from_weight(linear.weight.detach(), linear.bias)

    def _apply(self, fn: Any, recurse: bool = True) -> nn.Module:
        # model.to(torch.bfloat16) must move the fp8 codes and fp32 scales, not convert them.
        for name, t in list(self._buffers.items()):
            if t is not None:
                moved = fn(t)
                self._buffers[name] = moved if moved.dtype == t.dtype else t.to(moved.device)
        return self

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return qtensor.dequantize_fp8(self.qweight, self.scale, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantized_weight(x.dtype)
        b = weight_cache.cast(self.bias, x.dtype)
        return F.linear(x, w, b)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, "
            "fp8_e4m3"
        )
