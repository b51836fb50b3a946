"""QLinear: a drop-in nn.Linear whose weight is stored as packed integer codes plus scales.

No full-precision copy of the weight is kept; the forward dequantises into the input's dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from compress.modules import weight_cache
from compress.quant import qtensor


class QLinear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        bits: int,
        group_size: int | None = None,
        symmetric: bool = True,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size
        self.symmetric = symmetric
        g = qtensor.n_groups(in_features, group_size)
        cols = qtensor.packed_cols(in_features, bits) if bits < 8 else in_features
        self.register_buffer("qweight", torch.empty(out_features, cols, dtype=torch.uint8, device=device))
        self.register_buffer("scale", torch.empty(out_features, g, dtype=torch.float16, device=device))
        if symmetric:
            self.zero = None
        else:
            self.register_buffer("zero", torch.empty(out_features, g, dtype=torch.uint8, device=device))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, bits: int, group_size: int | None = None, symmetric: bool = True
    ) -> QLinear:
        w = linear.weight.detach()
        q = cls(
            linear.in_features, linear.out_features, linear.bias is not None, bits, group_size,
            symmetric, device=w.device,
        )
        codes, scale, zero = qtensor.quantize(w, bits, group_size, symmetric)
        q.qweight.copy_(qtensor.pack(codes, bits))
        q.scale.copy_(scale)
        if zero is not None:
            q.zero.copy_(zero)
        if linear.bias is not None:
            q.bias.data.copy_(linear.bias.detach().float())
        return q

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        codes = qtensor.unpack(self.qweight, self.bits, self.in_features)
        return qtensor.dequantize(codes, self.scale, self.zero, self.bits, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return weight_cache.linear(self, x, self.bias, self.dequantized_weight)

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.group_size else ""
        sym = "" if self.symmetric else ", asymmetric"
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}{g}{sym}"
