"""W4A8Linear: 4-bit weights (per output channel) with int8 activations on the int8 GEMM.

Int4 codes are valid int8 values, so the W8A8 kernel runs them unchanged. Only the packed
4-bit codes are stored; the int8 view the kernel needs is rebuilt after loading.
"""

from __future__ import annotations

import torch
from torch import nn

from compress.modules.w8a8 import W8A8Linear
from compress.quant import qtensor

OFFSET = 8  # symmetric 4-bit codes are stored unsigned, offset by 2**(4-1)


class W4A8Linear(W8A8Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool = True, act: str = "dynamic",
                 n_groups: int = 1, smooth: bool = False, device=None, **kw) -> None:
        super().__init__(in_features, out_features, bias, act, n_groups, smooth, device=device, **kw)
        self.register_buffer(
            "qweight",
            torch.empty(out_features, qtensor.packed_cols(in_features, 4), dtype=torch.uint8,
                        device=device),
        )
        self._non_persistent_buffers_set.add("weight")
        self.register_load_state_dict_post_hook(W4A8Linear._unpack_after_load)

    @staticmethod
    def _unpack_after_load(module: nn.Module, incompatible) -> None:
        if module.qweight.device.type != "meta":
            module._unpack()

    def _unpack(self) -> None:
        codes = qtensor.unpack(self.qweight, 4, self.in_features)
        self.weight = (codes.to(torch.int16) - OFFSET).to(torch.int8)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                   act: str = "dynamic", act_scale=None, smooth: torch.Tensor | None = None
                   ) -> W4A8Linear:
        """From symmetric 4-bit codes (uint8, offset 8) [out, in] and per-channel scales [out]."""
        out_f, in_f = codes.shape
        base = W8A8Linear.from_int8((codes.to(torch.int16) - OFFSET).to(torch.int8),
                                    scale.float().reshape(-1), bias, act=act, act_scale=act_scale,
                                    smooth=smooth)
        m = cls(in_f, out_f, bias is not None, act, base.n_groups, smooth is not None,
                device=codes.device)
        m.load_state_dict(base.state_dict(), strict=False)
        m.weight = base.weight.clone()
        m.qweight.copy_(qtensor.pack(codes, 4))
        return m

    def logical_weight_numel(self) -> int:
        return self.in_features * self.out_features
