"""QConv2d: a drop-in nn.Conv2d with a weight-only quantised weight.

The weight is quantised as the matrix ``[out_channels, in_channels / groups * kh * kw]`` (what a
conv computes on unfolded patches), so every weight-only format of the Linear layers applies
unchanged: the matrix lives in a child ``wq`` (QLinear, Int4Linear or FP8Linear, without bias),
per output channel or in groups along the flattened fan-in. The forward dequantises it into the
input's dtype, reshapes it to the kernel and runs ``F.conv2d`` with the original stride,
padding (and padding mode), dilation and groups.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from compress.modules import weight_cache


def _reversed_padding(padding: Any, kernel: tuple[int, int], dilation: tuple[int, int]) -> list:
    """[left_w, right_w, top_h, bottom_h], as nn.Conv2d computes for non-zero padding modes."""
    if isinstance(padding, str):
        if padding == "valid":
            return [0, 0, 0, 0]
        out = []
        for k, d in zip(reversed(kernel), reversed(dilation), strict=True):
            total = d * (k - 1)
            out += [total // 2, total - total // 2]
        return out
    ph, pw = _pair(padding)
    return [pw, pw, ph, ph]


class QConv2d(nn.Module):
    def __init__(
        self,
        wq: nn.Module,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        self.dilation = _pair(dilation)
        self.groups = groups
        self.padding_mode = padding_mode
        fan_in = in_channels // groups * self.kernel_size[0] * self.kernel_size[1]
        if (getattr(wq, "in_features", None), getattr(wq, "out_features", None)) != (
            fan_in, out_channels
        ):
            raise ValueError(f"QConv2d: weight matrix must be [{out_channels}, {fan_in}]")
        self.wq = wq
        self.register_buffer(
            "bias", torch.empty(out_channels, dtype=torch.float32, device=device) if bias else None
        )

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        bits: int = 8,
        group_size: int | None = None,
        symmetric: bool = True,
        format: str = "int",
    ) -> QConv2d:
        """Round-to-nearest weight-only quantisation of ``conv`` (format "int" or "fp8_e4m3")."""
        from compress.modules.weight_only import quantize_matrix

        wq, _ = quantize_matrix(conv.weight.detach().flatten(1), None, format, bits, group_size,
                                symmetric)
        return cls.wrap(conv, wq)

    @classmethod
    def wrap(cls, conv: nn.Conv2d, wq: nn.Module) -> QConv2d:
        """A QConv2d with ``conv``'s geometry and bias around the quantised matrix ``wq``."""
        q = cls(wq, conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                conv.padding, conv.dilation, conv.groups, conv.bias is not None,
                conv.padding_mode, device=conv.weight.device)
        if conv.bias is not None:
            q.bias.copy_(conv.bias.detach().float())
        return q

    def geometry(self) -> dict[str, Any]:
        """JSON-able constructor arguments (without the matrix and the bias)."""
        return {"in_channels": self.in_channels, "kernel_size": list(self.kernel_size),
                "stride": list(self.stride), "dilation": list(self.dilation),
                "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
                "groups": self.groups, "padding_mode": self.padding_mode}

    def _apply(self, fn: Any, recurse: bool = True) -> nn.Module:
        # The child keeps its own storage dtypes; the fp32 bias is moved, not converted.
        if recurse:
            for m in self.children():
                m._apply(fn)
        for name, t in list(self._buffers.items()):
            if t is not None:
                moved = fn(t)
                self._buffers[name] = moved if moved.dtype == t.dtype else t.to(moved.device)
        return self

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        w = self.wq.dequantized_weight(dtype)
        return w.reshape(self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantized_weight(x.dtype)
        b = weight_cache.cast(self.bias, x.dtype)
        if self.padding_mode != "zeros":
            pad = _reversed_padding(self.padding, self.kernel_size, self.dilation)
            x = F.pad(x, pad, mode=self.padding_mode)
            return F.conv2d(x, w, b, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, groups={self.groups}")
