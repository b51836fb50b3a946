"""Small weight-only layers keep their dequantised weight instead of rebuilding it per call.

QLinear, Int4Linear, VQLinear and LowRankQLinear rebuild their float weight at every call, which
on a large layer costs little beside the matmul and saves the memory of a float copy. On a
small layer (the demo's 256-wide blocks) the rebuild costs more than the matmul itself, so a
layer of at most ``MAX_ELEMENTS`` weights keeps the rebuilt weight and reuses it: the same
tensor the call would have built, so outputs are bit-equal (unless packed, below) and only
memory changes (at most ``MAX_ELEMENTS`` x 4 bytes per layer; the report's peak memory
includes it).
``DIT_COMPRESS_WEIGHT_CACHE=0`` (read at import) turns it off.

A kept weight may also be kept *packed* for oneDNN's GEMM (:func:`linear`): packed once instead
of reordered inside every call. Whether that pays is a property of the CPU and the dtype, so one
timing per process and dtype decides (:func:`packed_faster`). On an AMD EPYC (Zen 4) torch's
fp32 ``F.linear`` goes to MKL, whose code path there ran 2.0-2.3x slower than oneDNN's packed
fp32 GEMM at the demo's shapes ([128, 256] x [256, 256] up to [512, 1152] x [1152, 1152]); in
bf16 both are oneDNN and packing gained 4-14%, under the 20% margin asked, so bf16 stays on
``F.linear`` there. Packed outputs differ from ``F.linear``'s by fp32 summation order only.
Only without autograd (no gradient flows through the packed op): under ``torch.no_grad()`` or
``torch.inference_mode()``, as pipelines run. ``DIT_COMPRESS_PACKED_LINEAR=on|off`` forces it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

MAX_ELEMENTS = 1 << 19  # 512K weights (2 MB in fp32): the demo's layers, not a 1152-wide one

# what each layer derives from its stored tensors and keeps (see :func:`forget`)
DERIVED = ("_weight_cache", "_side_by_side", "_derived", "_derived_key", "_dense_w")


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


def _keeps(layer: torch.nn.Module) -> bool:
    return (ENABLED and layer.in_features * layer.out_features <= MAX_ELEMENTS
            and not torch.compiler.is_compiling())


def stamp(tensors: list | tuple) -> list:
    """What :func:`unchanged` compares later: each tensor (or None), its storage pointer and
    its version counter. Tensors made under ``torch.inference_mode()`` (a model loaded inside
    it) have no counter, and whatever changes their contents in place in this package calls
    :func:`forget` on the layer."""
    return [None if t is None else (t, t.data_ptr(), None if t.is_inference() else t._version)
            for t in tensors]


def unchanged(st: list | None, tensors: list | tuple) -> bool:
    """Whether ``tensors`` are still those :func:`stamp` saw: the same objects on the same
    storage (``.data`` swapped, e.g. by an offloading hook, changes the pointer), unchanged in
    place (version counter). A few attribute reads per tensor: this runs on every forward."""
    if st is None or len(st) != len(tensors):
        return False
    for s, t in zip(st, tensors):
        if s is None or t is None:
            if s is not t:
                return False
        elif s[0] is not t or t.data_ptr() != s[1] or (s[2] is not None and t._version != s[2]):
            return False
    return True


def valid(hit: tuple | None, dtype: torch.dtype, packed: bool, buffers: list) -> bool:
    """Whether a kept entry ``(dtype, packed, stamp, value)`` still holds for ``buffers``."""
    return (hit is not None and hit[0] == dtype and hit[1] == packed
            and unchanged(hit[2], buffers))


def _kept(layer: torch.nn.Module, dtype: torch.dtype, packed: bool,
          build: Callable[[torch.dtype], torch.Tensor]) -> torch.Tensor:
    buffers = [t for t in layer._buffers.values() if t is not None]
    hit = layer.__dict__.get("_weight_cache")
    if valid(hit, dtype, packed, buffers):
        return hit[3]
    w = build(dtype)
    if packed:
        w = pack(w)
    layer.__dict__["_weight_cache"] = (dtype, packed, stamp(buffers), w)
    return w


def weight(layer: torch.nn.Module, dtype: torch.dtype,
           build: Callable[[torch.dtype], torch.Tensor]) -> torch.Tensor:
    """``build(dtype)``, kept on ``layer`` while its buffers are unchanged (small layers only).
    Called on every forward of these layers, so it stays a few attribute reads."""
    if not _keeps(layer):
        return build(dtype)
    return _kept(layer, dtype, False, build)


def linear(layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None,
           build: Callable[[torch.dtype], torch.Tensor]) -> torch.Tensor:
    """``F.linear(x, build(x.dtype), bias)`` for a weight-only layer: the weight kept on a small
    layer (:func:`weight`), and kept packed for oneDNN where that is faster (:func:`use_packed`)."""
    dtype = x.dtype
    b = cast(bias, dtype)
    if not _keeps(layer):
        return F.linear(x, build(dtype), b)
    packed = use_packed(x)
    return matmul(x, _kept(layer, dtype, packed, build), b, packed)


# ---------------------------------------------------------------------------------------------
# oneDNN's packed GEMM


def _packed_ops_available() -> bool:
    ops = torch.ops.mkldnn
    return (torch.backends.mkldnn.is_available() and hasattr(ops, "_reorder_linear_weight")
            and hasattr(ops, "_linear_pointwise"))


def pack(w: torch.Tensor) -> torch.Tensor:
    """A weight [out, in] in oneDNN's blocked layout (for :func:`packed_linear` only)."""
    return torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), None)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., in] @ W^T + bias with W from :func:`pack` (no autograd)."""
    y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), packed, bias,
                                           "none", [], "")
    return y.view(*x.shape[:-1], y.shape[-1])


def matmul(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None,
           packed: bool) -> torch.Tensor:
    """x @ w^T + bias: ``w`` from :func:`pack` when ``packed``, else a plain [out, in] weight."""
    return packed_linear(x, w, bias) if packed else F.linear(x, w, bias)


def use_packed(x: torch.Tensor) -> bool:
    """Whether a kept weight runs packed for this input: CPU, no autograd, not being traced by
    torch.compile (which packs weights its own way), and packing timed faster for the dtype on
    this machine."""
    return (x.device.type == "cpu" and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling()
            and x.dtype in (torch.float32, torch.bfloat16) and packed_faster(x.dtype))


_DECIDED: dict[torch.dtype, bool] = {}


def packed_faster(dtype: torch.dtype) -> bool:
    """One timing per process and dtype: oneDNN's packed GEMM against ``F.linear`` at a small
    layer's shape ([256, 512] x [512, 512]); packed only when at least 20% faster, so a close
    call does not flip between runs (and with it the last bits of the outputs)."""
    hit = _DECIDED.get(dtype)
    if hit is None:
        hit = _DECIDED[dtype] = _decide_packed(dtype)
    return hit


def reset_packed_choice() -> None:
    """Forget the per-dtype decisions (tests; a changed ``DIT_COMPRESS_PACKED_LINEAR``)."""
    _DECIDED.clear()


def packed_choices() -> dict[str, str]:
    """The decisions made so far in this process, for the speed report: dtype -> kernel."""
    return {str(d).removeprefix("torch."): "onednn_packed" if v else "f_linear"
            for d, v in _DECIDED.items()}


def kept_kernels(root: torch.nn.Module) -> dict[str, str]:
    """dtype -> "onednn_packed" / "f_linear" for what the layers under ``root`` keep now (their
    last forward): weight-only layers, W8A8 layers run dequantised, small MoE pairs."""
    used: dict[str, str] = {}
    for m in root.modules():
        d = m.__dict__
        for entry in (d.get("_weight_cache"), d.get("_dense_w"), d.get("_side_by_side")):
            if entry is None:
                continue
            # (dtype, packed, ...) first, or W8A8's ((dtype, packed, device), weight)
            dtype, packed = entry[0][:2] if isinstance(entry[0], tuple) else entry[:2]
            kind = "onednn_packed" if packed else "f_linear"
            name = str(dtype).removeprefix("torch.")
            if used.get(name) != "onednn_packed":  # mixed: say that the packed one ran too
                used[name] = kind
    return used


def _decide_packed(dtype: torch.dtype) -> bool:
    forced = os.environ.get("DIT_COMPRESS_PACKED_LINEAR", "").strip().lower()
    if forced in ("off", "0", "no", "false"):
        return False
    if not _packed_ops_available():
        return False
    if forced in ("on", "1", "yes", "true"):
        return True
    from compress.metrics.timing import best_seconds_alternated

    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(256, 512, generator=g).to(dtype)
        w = torch.randn(512, 512, generator=g).to(dtype)
        b = torch.randn(512, generator=g).to(dtype)
        pk = pack(w)
        with torch.inference_mode():
            if not torch.allclose(packed_linear(x, pk, b).float(), F.linear(x, w, b).float(),
                                  rtol=0.05, atol=0.5):
                return False
            t_plain, t_packed = best_seconds_alternated(
                [lambda: F.linear(x, w, b), lambda: packed_linear(x, pk, b)], repeats=5)
    except Exception as e:  # noqa: BLE001  (any failure: the plain path, which always works)
        log.info("packed GEMM probe failed (%s); F.linear", e)
        return False
    choice = t_packed < 0.8 * t_plain
    log.info("small weight-only layers in %s: %s (%.0f vs %.0f us)", dtype,
             "oneDNN packed GEMM" if choice else "F.linear", t_packed * 1e6, t_plain * 1e6)
    return choice
