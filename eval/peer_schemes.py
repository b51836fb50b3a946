"""The peer schemes eval/peers.py applies: optimum-quanto, bitsandbytes and bf16 casts, each
a function that swaps a model's layers the way that tool does, and how their stored bytes are
counted (see eval/peers.py for what each row means and the notes per tool)."""

from __future__ import annotations

import glob
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from compress.errors import UserError
from compress.models.base import ModelHandle
from compress.modules.swap import set_submodule

Layers = list[tuple[str, nn.Module, str]]
# apply(handle, layers, calib) -> pass-specific report fields
ApplyFn = Callable[[ModelHandle, Layers, Any], dict[str, Any]]


@dataclass(frozen=True)
class _Peer:
    description: str
    apply: ApplyFn
    tool: str  # distribution name, for its version in the report
    settings: dict[str, Any]
    whole_model: bool = False
    prunes: bool = False  # removes weights: the size counts what is left


# ----------------------------------------------------------------------------- stored bytes


def _tensor_bytes(t: torch.Tensor, seen: set[int]) -> int:
    """Bytes ``t`` really holds: inner tensors of wrapper subclasses, shared storage once."""
    if hasattr(type(t), "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(t, n), seen) for n in names)
    if t.numel() == 0:
        return 0
    ptr = t.data_ptr()
    if ptr in seen:
        return 0
    seen.add(ptr)
    return t.numel() * t.element_size()


def peer_stored_bytes(module: nn.Module) -> int:
    """The transformer's stored bytes, counting quantized tensor subclasses by what they hold.

    Walks the state dict (what a save writes): quanto's QTensors are flattened recursively
    into their data / scale / shift tensors, bitsandbytes layers contribute their packed
    weight and the quant-state tensors their ``_save_to_state_dict`` emits.
    """
    seen: set[int] = set()
    return sum(_tensor_bytes(t, seen) for t in module.state_dict().values())


# ----------------------------------------------------------------------------- the peers


def _calib_calls(handle: ModelHandle, calib: Any) -> int:
    n = 0
    with torch.inference_mode():
        for i in range(len(calib)):
            s = calib.sample(i)
            handle.adapter.call(handle.transformer, s.args, s.kwargs)
            n += 1
    return n


def _quanto(weights: str, activations: str | None) -> ApplyFn:
    def apply(handle: ModelHandle, layers: Layers, calib: Any) -> dict[str, Any]:
        from optimum.quanto import Calibration, QModuleMixin, freeze, qtypes, quantize

        tr = handle.transformer
        names = [n for n, _, _ in layers]
        # quanto matches fnmatch patterns; escaped exact names select exactly our layers
        quantize(
            tr,
            weights=qtypes[weights],
            activations=None if activations is None else qtypes[activations],
            include=[glob.escape(n) for n in names],
        )
        out: dict[str, Any] = {}
        if activations is not None:
            if calib is None or len(calib) == 0:
                raise UserError("quanto activation calibration needs captured inputs")
            with Calibration(streamline=False):
                out["calibration_calls"] = _calib_calls(handle, calib)
        freeze(tr)
        swapped = [n for n, m in tr.named_modules() if isinstance(m, QModuleMixin)]
        if sorted(swapped) != sorted(names):
            raise RuntimeError(f"quanto quantized {len(swapped)} layers, expected {len(names)}")
        groups = {
            getattr(m, "weight_group_size", None)
            for m in tr.modules()
            if isinstance(m, QModuleMixin)
        }
        # per-channel (None) first, then the group sizes in order
        out["weight_group_sizes"] = ["channel"] * (None in groups) + sorted(
            g for g in groups if g is not None)
        return out

    return apply


def _bnb_nf4(handle: ModelHandle, layers: Layers, calib: Any) -> dict[str, Any]:
    import bitsandbytes as bnb

    tr = handle.transformer
    sizes: set[int] = set()
    for name, mod, _ in layers:
        w = mod.weight
        # bnb's default block of 64; its CPU kernel needs whole blocks per row, so a layer
        # narrower than that (tiny test models) takes bnb's smallest block, 32
        block = next((b for b in (64, 32) if mod.in_features % b == 0), 64)
        sizes.add(block)
        q = bnb.nn.Linear4bit(
            mod.in_features, mod.out_features, bias=mod.bias is not None,
            compute_dtype=w.dtype, quant_type="nf4", device="meta",
        )
        q.weight = bnb.nn.Params4bit(
            w.detach().clone(), requires_grad=False, blocksize=block, quant_type="nf4",
            module=q,
        )
        if mod.bias is not None:
            q.bias = nn.Parameter(mod.bias.detach().clone(), requires_grad=False)
        # Params4bit quantizes when moved to a real device (CPU included)
        set_submodule(tr, name, q.to(w.device))
    return {"blocksizes": sorted(sizes), "double_quant": True}


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


_INT8_CAST = "MatMul8bitLt: inputs will be cast"


def _bnb_int8(handle: ModelHandle, layers: Layers, calib: Any) -> dict[str, Any]:
    import bitsandbytes as bnb

    # bnb logs this on every matmul of a non-fp16 input; the report says it once instead
    bnb_log = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropMessage) for f in bnb_log.filters):
        bnb_log.addFilter(_DropMessage(_INT8_CAST))
    tr = handle.transformer
    threshold = None
    for name, mod, _ in layers:
        w = mod.weight
        q = bnb.nn.Linear8bitLt(
            mod.in_features, mod.out_features, bias=mod.bias is not None,
            has_fp16_weights=False, device="meta",
        )
        q.weight = bnb.nn.Int8Params(w.detach().clone(), requires_grad=False,
                                     has_fp16_weights=False)
        if mod.bias is not None:
            q.bias = nn.Parameter(mod.bias.detach().clone(), requires_grad=False)
        q = q.to(w.device)  # Int8Params quantizes (per-row absmax) when moved to a device
        threshold = q.state.threshold
        set_submodule(tr, name, q)
    return {"threshold": threshold,
            "activations": "cast to float16, then int8 per token (dynamic absmax)"}


def _cast_floats(obj: Any, dtype: torch.dtype) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, tuple):
        return tuple(_cast_floats(o, dtype) for o in obj)
    if isinstance(obj, list):
        return [_cast_floats(o, dtype) for o in obj]
    if type(obj) is dict:  # a copy: the caller's dicts (added_cond_kwargs) stay as they were
        return {k: _cast_floats(v, dtype) for k, v in obj.items()}
    if isinstance(obj, dict):
        for k in list(obj.keys()):  # in place: keeps diffusers' output classes intact
            obj[k] = _cast_floats(obj[k], dtype)
        return obj
    return obj


def _run_in_bf16(module: nn.Module) -> str:
    """Cast ``module`` to bf16; its floating inputs are cast to bf16, its outputs back."""
    outer = next(iter(module.parameters())).dtype
    module.to(torch.bfloat16)

    def pre(_m: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return _cast_floats(args, torch.bfloat16), _cast_floats(kwargs, torch.bfloat16)

    def post(_m: nn.Module, _args: tuple, _kwargs: dict, output: Any) -> Any:
        return _cast_floats(output, outer)

    module.register_forward_pre_hook(pre, with_kwargs=True)
    module.register_forward_hook(post, with_kwargs=True)
    return str(outer).replace("torch.", "")


def _bf16_layers(handle: ModelHandle, layers: Layers, calib: Any) -> dict[str, Any]:
    outer = {_run_in_bf16(mod) for _, mod, _ in layers}
    return {"io_dtype": sorted(outer)}


def _bf16_full(handle: ModelHandle, layers: Layers, calib: Any) -> dict[str, Any]:
    # The pipeline keeps latents and text embeddings in its own dtype: cast at the boundary.
    return {"io_dtype": [_run_in_bf16(handle.transformer)]}


class _GGUFLinear(nn.Module):
    """A Linear stored as GGUF blocks (what a downloaded .gguf file holds for it), computing
    with the weight those blocks dequantise to, as GGUF loaders (diffusers' GGUFLinear,
    ComfyUI-GGUF) do."""

    def __init__(self, lin: nn.Linear, qtype: str) -> None:
        import gguf

        super().__init__()
        kind = getattr(gguf.GGMLQuantizationType, qtype)
        w = lin.weight.detach().float().cpu().numpy()
        blocks = gguf.quants.quantize(w, kind)
        self.register_buffer("blocks", torch.from_numpy(blocks.copy()))
        self.register_buffer("bias", None if lin.bias is None else lin.bias.detach().clone())
        deq = torch.from_numpy(gguf.quants.dequantize(blocks, kind).reshape(w.shape).copy())
        self.register_buffer("_w", deq.to(lin.weight.dtype), persistent=False)
        self.in_features, self.out_features = lin.in_features, lin.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self._w.to(x.dtype),
                                          None if self.bias is None else self.bias.to(x.dtype))


def _gguf(qtype: str) -> ApplyFn:
    def apply(handle: ModelHandle, layers: Layers, calib: Any) -> dict[str, Any]:
        kept = []
        for name, mod, _ in layers:
            if mod.in_features % 32:  # GGUF blocks are 32 inputs: such rows stay float
                kept.append(name)
                continue
            owner, _, attr = name.rpartition(".")
            setattr(handle.transformer.get_submodule(owner) if owner else handle.transformer,
                    attr, _GGUFLinear(mod, qtype))
        return {"gguf_type": qtype, "left_float": kept}
    return apply


PEER_SPECS: dict[str, _Peer] = {
    "quanto-w8a8": _Peer(
        "optimum-quanto qint8 weights (per output channel) + qint8 static activations, "
        "calibrated with Calibration(streamline=False) on the captured inputs, then frozen",
        _quanto("qint8", "qint8"), "optimum-quanto",
        {"weights": "qint8", "activations": "qint8", "streamline": False},
    ),
    "quanto-w4a8": _Peer(
        "optimum-quanto qint4 weights (groups of up to 128 inputs) + qint8 static activations, "
        "calibrated with Calibration(streamline=False), then frozen",
        _quanto("qint4", "qint8"), "optimum-quanto",
        {"weights": "qint4", "activations": "qint8", "streamline": False},
    ),
    "quanto-w4": _Peer(
        "optimum-quanto qint4 weights (groups of up to 128 inputs), float activations, frozen",
        _quanto("qint4", None), "optimum-quanto", {"weights": "qint4", "activations": None},
    ),
    "quanto-w2": _Peer(
        "optimum-quanto qint2 weights (groups of up to 128 inputs), float activations, frozen",
        _quanto("qint2", None), "optimum-quanto", {"weights": "qint2", "activations": None},
    ),
    "bnb-nf4": _Peer(
        "bitsandbytes Linear4bit nf4 (blocks of 64, double-quantized absmax), swapped in by "
        "hand, computing in the model's dtype",
        _bnb_nf4, "bitsandbytes", {"quant_type": "nf4", "blocksize": 64, "double_quant": True},
    ),
    "bnb-int8": _Peer(
        "bitsandbytes Linear8bitLt: int8 weights per output row, activations cast to fp16 and "
        "quantized to int8 per token, int8 matmul; threshold at the class default (0: no "
        "outlier split), swapped in by hand",
        _bnb_int8, "bitsandbytes", {"has_fp16_weights": False, "threshold": "class default"},
    ),
    "gguf-q8_0": _Peer(
        "the original's Linears as GGUF Q8_0 (blocks of 32 int8 with an fp16 scale, the gguf "
        "package's quantiser: what a downloaded Q8_0 file holds), dequantised to compute",
        _gguf("Q8_0"), "gguf", {"type": "Q8_0"},
    ),
    "gguf-q4_0": _Peer(
        "the original's Linears as GGUF Q4_0 (blocks of 32 symmetric 4-bit codes with an fp16 "
        "scale), dequantised to compute",
        _gguf("Q4_0"), "gguf", {"type": "Q4_0"},
    ),
    "gguf-q4_1": _Peer(
        "the original's Linears as GGUF Q4_1 (blocks of 32 4-bit codes, fp16 scale and minimum), "
        "dequantised to compute",
        _gguf("Q4_1"), "gguf", {"type": "Q4_1"},
    ),
    "bf16": _Peer(
        "the targeted layers' weights cast to bfloat16 (their inputs cast to bf16, outputs "
        "back), everything else unchanged",
        _bf16_layers, "torch", {"dtype": "bfloat16"},
    ),
    "bf16-full": _Peer(
        "the whole transformer cast to bfloat16 (pipe.transformer.to(torch.bfloat16)); its "
        "inputs cast to bf16, its output back",
        _bf16_full, "torch", {"dtype": "bfloat16"}, whole_model=True,
    ),
}

def _tp_peers() -> dict[str, _Peer]:
    from peer_tp import magnitude

    return {f"tp-magnitude-{round(s * 100)}": _Peer(
        f"Torch-Pruning MagnitudePruner (L2): a quarter of the heads and enough feed-forward "
        f"channels for {s:.0%} of the blocks' parameters, Attention.heads fixed by hand",
        magnitude(s), "torch-pruning", {"sparsity": s, "head_ratio": 0.25, "round_to": 8},
        whole_model=True, prunes=True) for s in (0.2, 0.3)}


PEER_SPECS.update(_tp_peers())


def _ao_peers() -> dict[str, _Peer]:
    from peer_ao import peers

    return peers(lambda desc, apply, tool, settings: _Peer(desc, apply, tool, settings))


PEER_SPECS.update(_ao_peers())
PEERS: dict[str, str] = {name: spec.description for name, spec in PEER_SPECS.items()}
