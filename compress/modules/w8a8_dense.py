"""W8A8 layers too small for int8 to pay: their weights run dequantised instead.

Quantising activations per token, the int8 GEMM and the rescale cost a few fixed passes; on a
small layer (the demo's 256-wide blocks, 32 tokens) they take longer than the whole float
matmul they replace. At its first call a W8A8Linear times both forms on its real input and
keeps the faster: the int8 path, or ``F.linear`` with its weight dequantised once (int8 codes
times scales, smoothing undone) and kept in the input's dtype (packed for oneDNN where that
times faster: :func:`compress.modules.weight_cache.use_packed`). Layers above ``MAX_MACS`` are
not timed (int8 wins there on every CPU measured, and timing them would cost seconds).

The dense form skips activation quantisation, so its output is closer to the original's, not
bit-equal to the int8 form's. Each layer decides per token count (a new resolution or batch is
timed at its first call); decisions are cached per process by layer shape, tokens, dtype
and mode, so a model and its reload in one process compute alike; another machine (or load)
may choose otherwise. ``DIT_COMPRESS_W8A8_DENSE=never`` or ``=always`` forces the choice.
The run's report counts the layers that chose the dense form (``speed.w8a8_dense``).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from compress.metrics.timing import best_seconds
from compress.modules import weight_cache

MAX_MACS = 1 << 26  # tokens x in x out above which the int8 path is kept without timing
_DECISIONS: dict[tuple, bool] = {}


def _forced() -> str:
    v = os.environ.get("DIT_COMPRESS_W8A8_DENSE", "auto").strip().lower()
    return v if v in ("never", "always") else "auto"


def weight(layer: Any, dtype: torch.dtype, packed: bool = False) -> torch.Tensor:
    """The dequantised weight in ``dtype`` (built once, dropped when the buffers change); with
    ``packed``, in oneDNN's layout for :func:`weight_cache.packed_linear`."""
    hit = layer._dense_w
    if hit is None or hit[0] != (dtype, packed, layer.weight.device):
        w = layer.dequantized_weight(dtype).contiguous()
        hit = ((dtype, packed, layer.weight.device), weight_cache.pack(w) if packed else w)
        layer._dense_w = hit
    return hit[1]


def forward(layer: Any, x: torch.Tensor, activation: str) -> torch.Tensor:
    from compress.quant import kernels

    b = weight_cache.cast(layer.bias, x.dtype)
    packed = weight_cache.use_packed(x)
    y = weight_cache.matmul(x, weight(layer, x.dtype, packed), b, packed)
    return kernels.apply_activation(y, activation)


@torch.no_grad()
def _decide(layer: Any, x: torch.Tensor) -> bool:
    forced = _forced()
    if forced != "auto":
        return forced == "always"
    m = x.numel() // max(1, layer.in_features)
    if x.device.type != "cpu" or m * layer.in_features * layer.out_features > MAX_MACS:
        return False
    key = (layer.in_features, layer.out_features, m, x.dtype, layer.act,
           layer.smooth is not None, layer.activation, type(layer).__name__)
    if key not in _DECISIONS:
        from compress.modules.w8a8 import clear_input_cache

        def int8() -> None:
            clear_input_cache()
            xq, xs = layer.quantize_input(x)
            layer.matmul_codes(xq, xs, x.dtype)

        _DECISIONS[key] = best_seconds(lambda: forward(layer, x, layer.activation)) < best_seconds(int8)
    if not _DECISIONS[key]:
        layer._dense_w = None  # the timing built it; an int8 layer does not keep it
    return _DECISIONS[key]


def _by_shape(layer: Any) -> dict:
    d = layer.__dict__.get("_dense_by")
    if d is None:
        d = layer.__dict__["_dense_by"] = {}
    return d


def use_dense(layer: Any, x: torch.Tensor) -> bool:
    """Whether ``layer`` runs its weights dequantised, decided at its first eager call with
    this many tokens (another token count, e.g. another resolution, is decided anew).
    ``layer._dense`` keeps the latest decision (the report's count; compiled code)."""
    if torch.compiler.is_compiling():
        return bool(layer._dense)
    key = (x.numel() // max(1, layer.in_features), x.dtype, x.device.type)
    by = _by_shape(layer)
    hit = by.get(key)
    if hit is None:
        hit = by[key] = _decide(layer, x)
    layer._dense = hit
    return hit


def use_dense_for(layer: Any, tokens: int, like: torch.Tensor) -> bool:
    """:func:`use_dense` for a layer whose input is not at hand yet (the second projection of
    a fused feed-forward): decided on a random input of that many tokens."""
    if torch.compiler.is_compiling():
        return bool(layer._dense)
    hit = _by_shape(layer).get((tokens, like.dtype, like.device.type))
    if hit is not None:
        layer._dense = hit
        return hit
    g = torch.Generator(device=like.device).manual_seed(0)
    x = torch.randn(tokens, layer.in_features, generator=g, device=like.device).to(like.dtype)
    return use_dense(layer, x)
