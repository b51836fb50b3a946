"""Small weight-only layers keep their dequantised weight instead of rebuilding it per call.

QLinear, Int4Linear, VQLinear and LowRankQLinear rebuild their float weight at every call, which
on a large layer costs little beside the matmul and saves the memory of a float copy. On a
small layer (the demo's 256-wide blocks) the rebuild costs more than the matmul itself, so a
layer of at most ``MAX_ELEMENTS`` weights keeps the rebuilt weight and reuses it: the same
tensor the call would have built, so outputs are bit-equal and only memory changes (at most
``MAX_ELEMENTS`` x 4 bytes per layer; the report's peak memory includes it).
``DIT_COMPRESS_WEIGHT_CACHE=0`` (read at import) turns it off.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

MAX_ELEMENTS = 1 << 19  # 512K weights (2 MB in fp32): the demo's layers, not a 1152-wide one

# what each layer derives from its stored tensors and keeps (see :func:`forget`)
DERIVED = ("_weight_cache", "_side_by_side", "_derived", "_derived_key", "_dense_w")


def version(t: torch.Tensor) -> int:
    """``t``'s in-place version counter, for keys of what is derived from it. Tensors made under
    ``torch.inference_mode()`` (a model loaded inside it) have none: 0, and whatever changes
    their contents in place in this package calls :func:`forget` on the layer."""
    return 0 if t.is_inference() else t._version


def cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``t`` in ``dtype`` (None stays None); no call into torch when it already is (a bias on
    every forward of a small layer: ``Tensor.to`` costs about a microsecond even as a no-op)."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


def forget(layer: torch.nn.Module) -> None:
    """Drop what ``layer`` derived from its stored tensors (after they changed in place)."""
    for name in DERIVED:
        if name in layer.__dict__:
            layer.__dict__[name] = None


ENABLED = os.environ.get("DIT_COMPRESS_WEIGHT_CACHE", "1").strip().lower() not in (
    "0", "false", "off", "no")


def weight(layer: torch.nn.Module, dtype: torch.dtype,
           build: Callable[[torch.dtype], torch.Tensor]) -> torch.Tensor:
    """``build(dtype)``, kept on ``layer`` while its buffers are unchanged (small layers only).
    Called on every forward of these layers, so it stays a few dict reads."""
    if (not ENABLED or layer.in_features * layer.out_features > MAX_ELEMENTS
            or torch.compiler.is_compiling()):
        return build(dtype)
    key = (dtype, *((t.data_ptr(), version(t)) for t in layer._buffers.values() if t is not None))
    hit = layer.__dict__.get("_weight_cache")
    if hit is not None and hit[0] == key:
        return hit[1]
    w = build(dtype)
    layer.__dict__["_weight_cache"] = (key, w)
    return w
