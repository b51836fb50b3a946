"""VQLinear: a drop-in nn.Linear whose weight is stored as codeword indices and fp16 codebooks.

Stored (safetensors): ``indices`` uint8 [out, packed] (one byte per index when the codebook has
256 entries, else densely bit-packed, ``log2 k`` bits an index), ``codebooks`` fp16 [G, k, d]
(G codebooks, one per group of ``rows`` output rows) and the bias. The forward rebuilds the
weight tile by tile (at most ``TILE`` elements at a time) in the input's dtype and multiplies;
no full-precision copy of the weight is kept between calls. The unpacked indices (one byte each)
are cached after the first call when they were bit-packed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from compress.modules import weight_cache
from compress.quant import qtensor
from compress.quant.vq import group_of_rows, index_bits

TILE = 1 << 23  # weight elements rebuilt at once (16 MB in bf16)


class VQLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, dim: int, k: int,
                 rows: int | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        if in_features % dim:
            raise ValueError(f"in_features {in_features} is not a multiple of dim {dim}")
        if not 2 <= k <= 256:
            raise ValueError(f"codebook size {k}: 2 .. 256 codewords")
        self.in_features, self.out_features = in_features, out_features
        self.dim, self.k = dim, k
        self.rows = None if rows is None or rows >= out_features else rows
        self.bits = index_bits(k)
        nv = in_features // dim
        cols = nv if self.bits == 8 else qtensor.packed_cols(nv, self.bits)
        g = 1 if self.rows is None else -(-out_features // self.rows)
        self.register_buffer("indices", torch.empty(out_features, cols, dtype=torch.uint8,
                                                     device=device))
        self.register_buffer("codebooks", torch.empty(g, k, dim, dtype=torch.float16,
                                                      device=device))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self._unpacked: torch.Tensor | None = None

    @classmethod
    def from_assignment(cls, books: torch.Tensor, idx: torch.Tensor, bias: torch.Tensor | None,
                        rows: int | None) -> VQLinear:
        """From codebooks [G, k, d] (rounded to fp16 here) and indices [out, in/d]."""
        _, k, d = books.shape
        out_f, nv = idx.shape
        m = cls(nv * d, out_f, bias is not None, d, k, rows, device=books.device)
        codes = idx.to(torch.uint8)
        m.indices.copy_(codes if m.bits == 8 else qtensor.pack(codes, m.bits))
        m.codebooks.copy_(books.detach().half())
        if bias is not None:
            m.bias.data.copy_(bias.detach().float())
        return m

    def _load_from_state_dict(self, *args, **kwargs):
        self._unpacked = None
        super()._load_from_state_dict(*args, **kwargs)

    def codes(self) -> torch.Tensor:
        """Indices [out, in/d] as uint8 (unpacked once and cached when bit-packed)."""
        if self.bits == 8:
            return self.indices
        u = self._unpacked
        if u is None or u.device != self.indices.device:
            u = qtensor.unpack(self.indices, self.bits, self.in_features // self.dim)
            self._unpacked = u
        return u

    def _tile(self, r0: int, r1: int, dtype: torch.dtype) -> torch.Tensor:
        k, d = self.k, self.dim
        table = self.codebooks.reshape(-1, d).to(dtype)
        idx = self.codes()[r0:r1].to(torch.int32)
        if self.rows is not None:
            gid = group_of_rows(self.out_features, self.rows)[r0:r1].to(idx.device, torch.int32)
            idx = idx + (gid * k)[:, None]
        return table.index_select(0, idx.reshape(-1)).view(r1 - r0, self.in_features)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self._tile(0, self.out_features, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = weight_cache.cast(self.bias, x.dtype)
        step = max(1, TILE // self.in_features)
        if step >= self.out_features:
            return weight_cache.linear(self, x, b, self.dequantized_weight)
        parts = []
        for r0 in range(0, self.out_features, step):
            r1 = min(r0 + step, self.out_features)
            parts.append(F.linear(x, self._tile(r0, r1, x.dtype), None if b is None else b[r0:r1]))
        return torch.cat(parts, dim=-1)

    def extra_repr(self) -> str:
        g = f", rows={self.rows}" if self.rows else ""
        return (f"in={self.in_features}, out={self.out_features}, dim={self.dim}, k={self.k}{g}, "
                f"{self.bits / self.dim:g} bits/weight + codebooks")
