"""Attention as two matmuls and a softmax where that times faster than torch's fused kernel.

On a CPU, torch's ``F.scaled_dot_product_attention`` runs a flash-attention kernel built for
long sequences. At a DiT's shapes it is often the slower choice: on an AMD EPYC (Zen 4), 2
threads, in bf16 at PixArt-XL's [2, 16, 256, 72] self-attention it took 3.9 ms against 1.5 ms
for ``softmax(q k^T * scale) v`` computed one sample at a time with the softmax in place (the
cross-attention over 120 text tokens: 2.1 against 1.2 ms); at the demo's fp32 shapes the fused
kernel wins. So the choice is made per shape, by timing both forms once on the first call's own
tensors (:func:`matmul_faster`), and the matmul form is taken only when it is at least 20%
faster, so that a close call does not flip between runs (and with it the last bits of the
outputs).

This is a kernel choice, not a gain of the compression: the original model would gain the same
from it. The report says which shapes ran which form (``speed.attention``).

Scope. :func:`enable` puts it under one module (a compressed transformer, at load and in the
run's evaluation): torch's ``F.scaled_dot_product_attention`` is replaced once per process by
:func:`_dispatch`, which runs torch's own function unless the current thread is inside the
forward of an enabled module (a thread-local depth kept by forward hooks), so other models and
other threads are untouched. It applies only where the matmul form computes the same thing:
CPU tensors of four dimensions, one floating dtype, no autograd, no dropout, not causal, no
grouped heads, no mask or an additive float mask. ``DIT_COMPRESS_ATTENTION=auto|sdpa|matmul``
forces the choice.

Under ``torch.compile`` of an enabled module (the whole transformer), attention is traced as
one opaque operator, ``dit_compress::attention``, which makes the same per-shape choice when
the compiled code first runs: inductor neither rewrites the matmul form back into the fused
kernel nor generates its own softmax over the bf16 scores (slower here: a 4-block PixArt-XL
step compiled ran 0.68x of eager bf16 with the matmul form traced as plain operations, 0.59x
with the operator, 0.64x with torch's kernel). Whether the trace is inside an enabled module
is a plain global the forward hooks raise while dynamo traces them (dynamo follows its
changes within the traced frame). The blocks diffusers compiles one by one
(``compile_repeated_blocks``, the classes a model lists in ``_repeated_blocks``) carry the same
hooks, so their compiled code holds the operator too.

The softmax sees the scores in the input dtype (bf16 rounds them before the softmax, as
diffusers' classic attention processor does); torch's fused kernel keeps them in fp32. At
PixArt-XL shapes that moved the bf16 output's SQNR against fp32 from 34.43 to 34.44 dB
(``eval/attention_check.py``). The report's quality figures are measured on what runs.
"""

from __future__ import annotations

import logging
import os
import threading

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

_TORCH_SDPA = F.scaled_dot_product_attention  # torch's own, kept before any replacement
_LOCAL = threading.local()
_CHOICE: dict[tuple, bool] = {}
_TIMES: dict[tuple, tuple[float, float]] = {}
CHUNK_BYTES = 4 << 20  # scores computed in pieces of at most this size (heads of one sample)
MARGIN = 0.8  # the matmul form must take at most this fraction of the fused kernel's time
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def matmul_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     attn_mask: torch.Tensor | None = None,
                     scale: float | None = None) -> torch.Tensor:
    """``softmax((q * scale) k^T + attn_mask) v`` for [B, H, N, D] inputs, one sample and a few
    heads at a time (scores of at most ``CHUNK_BYTES``), the softmax in place. The output has
    the fused kernel's layout (heads inner: ``out.transpose(1, 2)`` is contiguous), so the
    usual ``transpose(1, 2).reshape(B, N, H * D)`` that follows is free."""
    b, h, n, _ = q.shape
    m, dv = k.shape[2], v.shape[-1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = torch.empty(b, n, h, dv, dtype=q.dtype, device=q.device).transpose(1, 2)
    mask = None if attn_mask is None else attn_mask.expand(b, h, n, m)
    step = max(1, min(h, CHUNK_BYTES // max(1, n * m * q.element_size())))
    softmax_ = torch.ops.aten._softmax.out
    for i in range(b):
        for j in range(0, h, step):
            hs = slice(j, j + step)
            s = torch.matmul(q[i, hs] * scale, k[i, hs].transpose(-1, -2))
            if mask is not None:
                s.add_(mask[i, hs])
            softmax_(s, -1, False, out=s)
            torch.matmul(s, v[i, hs], out=out[i, hs])
    return out


def _forced() -> str:
    return os.environ.get("DIT_COMPRESS_ATTENTION", "auto").strip().lower()


def _handled(q, k, v, attn_mask, dropout_p, is_causal, enable_gqa) -> bool:
    """Whether the matmul form computes what torch's function would for these arguments."""
    if not (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor)
            and isinstance(v, torch.Tensor)):
        return False
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or q.device.type != "cpu":
        return False
    if q.dtype not in _FLOATS or k.dtype != q.dtype or v.dtype != q.dtype:
        return False
    if dropout_p or is_causal or enable_gqa:
        return False
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] or q.shape[-1] != k.shape[-1]:
        return False
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return False
    if attn_mask is not None:
        if attn_mask.dtype != q.dtype or attn_mask.device != q.device or attn_mask.dim() > 4:
            return False
        # broadcastable to [B, H, N, M] (by hand: torch.broadcast_shapes costs ~12 us a call)
        want = (*q.shape[:3], k.shape[2])
        if any(d not in (1, w) for d, w in zip(reversed(attn_mask.shape), reversed(want))):
            return False
    return True


_SEEN: dict[tuple | None, tuple | None] = {}  # call signature -> shape key (None: not taken)


def _signature(q, k, v, attn_mask, dropout_p, is_causal, enable_gqa) -> tuple | None:
    """What :func:`_handled` depends on, read cheaply (its own checks cost ~4 us a call)."""
    try:
        grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad
                                            or v.requires_grad)
        mask = None if attn_mask is None else (attn_mask.dtype, attn_mask.shape,
                                               attn_mask.device)
        return (q.dtype, k.dtype, v.dtype, q.shape, k.shape, v.shape, q.device, mask,
                dropout_p, is_causal, enable_gqa, grad)
    except AttributeError:  # not tensors: torch's function says what is wrong
        return None


def _key(q, k, v, attn_mask) -> tuple:
    return (q.dtype, tuple(q.shape), tuple(k.shape), v.shape[-1],
            None if attn_mask is None else tuple(attn_mask.shape))


def matmul_faster(q, k, v, attn_mask=None, scale=None, key: tuple | None = None) -> bool:
    """One timing per shape (this call's own tensors): the matmul form against torch's fused
    kernel, taken when it is at least 20% faster and agrees with it."""
    key = _key(q, k, v, attn_mask) if key is None else key
    hit = _CHOICE.get(key)
    if hit is not None:
        return hit
    forced = _forced()
    if forced in ("sdpa", "matmul"):
        hit = forced == "matmul"
    else:
        hit = _decide(key, q, k, v, attn_mask, scale)
    _CHOICE[key] = hit
    return hit


def _decide(key, q, k, v, attn_mask, scale) -> bool:
    from compress.metrics.timing import best_seconds_alternated

    def fused():
        return _TORCH_SDPA(q, k, v, attn_mask=attn_mask, scale=scale)

    def mm():
        return matmul_attention(q, k, v, attn_mask, scale)

    try:
        ref, got = fused().float(), mm().float()
        tol = 1e-4 if q.dtype == torch.float32 else 5e-2
        if not torch.allclose(got, ref, rtol=tol, atol=tol * max(1.0, ref.abs().max().item())):
            log.info("attention %s: the matmul form disagrees with torch's; torch's", key)
            return False
        t_fused, t_mm = best_seconds_alternated([fused, mm], rounds=2, repeats=2)
    except Exception as e:  # noqa: BLE001  (any failure: torch's own function, which works)
        log.info("attention probe failed (%s); torch's kernel", e)
        return False
    _TIMES[key] = (t_fused, t_mm)
    choice = t_mm < MARGIN * t_fused
    log.info("attention %s: %s (%.0f vs %.0f us)", key,
             "matmul form" if choice else "torch's kernel", t_mm * 1e6, t_fused * 1e6)
    return choice


def _dispatch(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
              enable_gqa=False):
    """Stands in for ``F.scaled_dot_product_attention``: torch's own unless inside an enabled
    module's forward (this thread), eager, and :func:`matmul_faster` for these shapes."""
    if torch.compiler.is_compiling():
        if _TRACED and _handled(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa):
            return _attention_op(query, key, value, attn_mask, scale)
    elif getattr(_LOCAL, "depth", 0):
        sig = _signature(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa)
        k = _SEEN.get(sig, ())
        if k == ():  # first call of this signature: is it one the matmul form computes?
            k = _SEEN[sig] = (_key(query, key, value, attn_mask) if sig is not None and _handled(
                query, key, value, attn_mask, dropout_p, is_causal, enable_gqa) else None)
        if k is not None:
            _LOCAL.used.add(k)
            if matmul_faster(query, key, value, attn_mask, scale, key=k):
                return matmul_attention(query, key, value, attn_mask, scale)
    return _TORCH_SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                       is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)


_dispatch.__doc__ = (_dispatch.__doc__ or "") + "\n\ntorch's documentation:\n" + (
    _TORCH_SDPA.__doc__ or "")
_INSTALL_LOCK = threading.Lock()
_TRACED = 0  # enabled forwards being traced by dynamo now (see the module docstring)


@torch.library.custom_op("dit_compress::attention", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  attn_mask: torch.Tensor | None, scale: float | None) -> torch.Tensor:
    """What compiled code calls: the same per-shape choice as in eager, the output always in
    :func:`_like`'s layout (the layout the compiled graph was traced with)."""
    if matmul_faster(q, k, v, attn_mask, scale):
        return matmul_attention(q, k, v, attn_mask, scale)
    out = _TORCH_SDPA(q, k, v, attn_mask=attn_mask, scale=scale)
    want = _like(q, v)
    return out if out.stride() == want.stride() else want.copy_(out)


def _like(q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    b, h, n, _ = q.shape
    return q.new_empty(b, n, h, v.shape[-1]).transpose(1, 2)


@_attention_op.register_fake
def _(q, k, v, attn_mask, scale):
    return _like(q, v)


def _install() -> None:
    with _INSTALL_LOCK:
        if F.scaled_dot_product_attention is not _dispatch:
            F.scaled_dot_product_attention = _dispatch


def _enter(module, args):
    global _TRACED
    if torch.compiler.is_compiling():
        _TRACED += 1
    else:
        depth = getattr(_LOCAL, "depth", 0)
        if not depth:  # the outermost enabled module records the shapes its forward ran
            _LOCAL.used = module.__dict__.setdefault("_dit_compress_attention_used", set())
        _LOCAL.depth = depth + 1


def _leave(module, args, *rest):
    global _TRACED
    if torch.compiler.is_compiling():
        _TRACED = max(0, _TRACED - 1)
    else:
        _LOCAL.depth = max(0, getattr(_LOCAL, "depth", 0) - 1)


def _hosts(module: torch.nn.Module) -> list[torch.nn.Module]:
    """``module`` and the blocks diffusers compiles one by one inside it."""
    repeated = set(getattr(module, "_repeated_blocks", None) or ())
    return [module, *(m for m in module.modules()
                      if m is not module and type(m).__name__ in repeated)]


def enabled(module: torch.nn.Module) -> bool:
    return _enter in module._forward_pre_hooks.values()


def enable(module: torch.nn.Module) -> torch.nn.Module:
    """Let attention inside ``module``'s forward take the matmul form where it times faster
    (idempotent; the hooks are found by identity, so a deep copy of an enabled module is
    enabled and disables on its own). Returns ``module``."""
    _install()
    for m in _hosts(module):
        if not enabled(m):
            m.register_forward_pre_hook(_enter)
            m.register_forward_hook(_leave, always_call=True)
    return module


def disable(module: torch.nn.Module) -> None:
    """Undo :func:`enable` on ``module`` (torch's function everywhere in it again)."""
    for m in _hosts(module):
        for hooks in (m._forward_pre_hooks, m._forward_hooks):
            for hid in [i for i, f in hooks.items() if f is _enter or f is _leave]:
                del hooks[hid]
                m._forward_hooks_always_called.pop(hid, None)


def reset_choices() -> None:
    """Forget the per-shape decisions (tests; a changed ``DIT_COMPRESS_ATTENTION``)."""
    _CHOICE.clear()
    _TIMES.clear()
    _SEEN.clear()


def choices(module: torch.nn.Module | None = None) -> list[dict]:
    """The decisions made so far in this process (or for the shapes ``module``'s forwards
    ran, when given), for the speed report."""
    rows = []
    keys = _CHOICE if module is None else module.__dict__.get("_dit_compress_attention_used", ())
    for key in sorted(keys, key=str):
        mm = _CHOICE.get(key)
        if mm is None:
            continue
        dtype, qs, ks, _dv, ms = key
        t = _TIMES.get(key)
        rows.append({"dtype": str(dtype).removeprefix("torch."), "q": list(qs), "k": list(ks),
                     "mask": ms is not None, "kernel": "matmul" if mm else "sdpa",
                     **({"us": {"sdpa": round(t[0] * 1e6, 1), "matmul": round(t[1] * 1e6, 1)}}
                        if t else {})})
    return rows
