"""LowRankQLinear: SVDQuant-style layer, a 16-bit low-rank branch plus a quantised residual.

y = (x/s) L2^T L1^T + Q_a(x/s) Q_w(R)^T + b. The branch absorbs the outliers that smoothing
moved into the weight, so the residual quantises well at 4 bits. The activation quantiser is
simulated (fake-quantised per token): CPUs have no int4 GEMM, so this module gives W4A4's
numerics, not its speed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from compress.modules import weight_cache
from compress.quant import qtensor
from compress.quant.smooth import fake_quant_act


class LowRankQLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, rank: int, w_bits: int,
                 group_size: int | None, a_bits: int | None, smooth: bool, device=None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.rank, self.w_bits, self.group_size, self.a_bits = rank, w_bits, group_size, a_bits
        g = qtensor.n_groups(in_features, group_size)
        cols = qtensor.packed_cols(in_features, w_bits) if w_bits < 8 else in_features
        kw = {"device": device}
        self.register_buffer("qweight", torch.empty(out_features, cols, dtype=torch.uint8, **kw))
        self.register_buffer("scale", torch.empty(out_features, g, dtype=torch.float16, **kw))
        self.register_buffer("l1", torch.empty(out_features, rank, dtype=torch.float16, **kw))
        self.register_buffer("l2", torch.empty(rank, in_features, dtype=torch.float16, **kw))
        self.register_buffer("smooth", torch.empty(in_features, dtype=torch.float32, **kw)
                             if smooth else None)
        self.register_buffer("bias", torch.empty(out_features, dtype=torch.float32, **kw)
                             if bias else None)

    @classmethod
    def from_lowrank(cls, lq, bias: torch.Tensor | None, group_size: int | None,
                     a_bits: int | None) -> LowRankQLinear:
        out_f, in_f = lq.codes.shape
        m = cls(in_f, out_f, bias is not None, lq.l1.shape[1], lq.bits, group_size, a_bits,
                lq.s is not None, device=lq.codes.device)
        m.qweight.copy_(qtensor.pack(lq.codes, lq.bits))
        m.scale.copy_(lq.scale)
        m.l1.copy_(lq.l1.half())
        m.l2.copy_(lq.l2.half())
        if lq.s is not None:
            m.smooth.copy_(lq.s.float())
        if bias is not None:
            m.bias.copy_(bias.detach().float())
        return m

    def residual_weight(self) -> torch.Tensor:
        codes = qtensor.unpack(self.qweight, self.w_bits, self.in_features)
        return qtensor.dequantize(codes, self.scale, None, self.w_bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = x.dtype
        xs = x.float()
        if self.smooth is not None:
            xs = xs / self.smooth
        branch = (xs @ self.l2.float().T) @ self.l1.float().T
        resid = weight_cache.weight(self, torch.float32, lambda _: self.residual_weight())
        main = F.linear(fake_quant_act(xs, self.a_bits, "token"), resid)
        y = branch + main
        if self.bias is not None:
            y = y + self.bias
        return y.to(dt)

    def logical_weight_numel(self) -> int:
        return self.in_features * self.out_features

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, rank={self.rank}, "
                f"w{self.w_bits}a{self.a_bits}, group={self.group_size}")
