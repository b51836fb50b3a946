"""Data flow of one forward call, recorded at the level of torch functions.

A ``TorchFunctionMode`` sees every torch function and tensor method the model calls. Most of
them (views, chunks, additions, products) only carry data along; a few are the operations a
role is read from: weight layers (``F.linear``/``F.conv*`` on a known weight), softmax
attention (``scaled_dot_product_attention``, or a product, a softmax and a second product),
point-wise non-linearities and normalisations. Every tensor remembers which of those
operations it last came from (its producers, through any number of carrying operations), so
the graph of interesting operations is known after one call, whatever the model's code looks
like. Tensors are held only by weak references: the trace keeps no activation alive.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

log = logging.getLogger(__name__)

_LAYER_FUNCS = {F.linear: "linear", F.conv1d: "conv", F.conv2d: "conv", F.conv3d: "conv"}
_ACTS = {"gelu", "silu", "relu", "mish", "elu", "selu", "celu", "leaky_relu", "softplus",
         "hardswish", "hardsigmoid", "tanh", "sigmoid", "glu", "relu6", "gelu_", "silu_", "relu_"}
_NORMS = {"layer_norm", "group_norm", "rms_norm", "batch_norm", "instance_norm", "normalize",
          "rsqrt", "local_response_norm"}
_SOFTMAX = {"softmax", "_softmax", "log_softmax"}
_MATMUL = {"matmul", "bmm", "__matmul__", "__rmatmul__", "einsum", "baddbmm"}
_MUL = {"mul", "__mul__", "__rmul__", "mul_", "__imul__", "addcmul", "multiply"}


@dataclass
class Node:
    """One interesting operation of the traced call.

    kind: "layer", "attn" (softmax attention, its output), "softmax", "matmul", "act", "norm".
    name: the layer's qualified name (layers) or the torch function's name.
    inputs: producer node ids of each tensor operand, in argument order.
    info: per kind: rows/batch of a layer's input, q/k lengths of an attention ...
    """

    index: int
    kind: str
    name: str
    inputs: list[frozenset[int]]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def producers(self) -> frozenset[int]:
        return frozenset().union(*self.inputs) if self.inputs else frozenset()


def _fname(func: Any) -> str:
    return getattr(func, "__name__", None) or str(func)


def tensors_in(obj: Any) -> list[torch.Tensor]:
    """Every tensor in a nested structure of tuples, lists and dicts (diffusers outputs are dicts)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in tensors_in(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in tensors_in(o)]
    return []


class FlowTrace(TorchFunctionMode):
    """Record the interesting operations of a call and the data flow between them.

    Args:
        layers: weight tensor id -> qualified name of its layer (``nn.Linear``/``nn.Conv*``).
    """

    def __init__(self, layers: dict[int, str]) -> None:
        super().__init__()
        self.layers = layers
        self.nodes: list[Node] = []
        self.mul_pairs: list[tuple[frozenset[int], frozenset[int]]] = []
        self._prov: dict[int, tuple[weakref.ref, frozenset[int]]] = {}

    # -------------------------------------------------------------------- provenance store
    def prov(self, t: Any) -> frozenset[int]:
        if not isinstance(t, torch.Tensor):
            return frozenset()
        entry = self._prov.get(id(t))
        if entry is None or entry[0]() is not t:
            return frozenset()
        return entry[1]

    def _set(self, out: Any, p: frozenset[int]) -> None:
        for t in tensors_in(out):
            try:
                self._prov[id(t)] = (weakref.ref(t), p)
            except TypeError:  # pragma: no cover - tensors without weakref support
                pass

    def _node(self, kind: str, name: str, inputs: list[frozenset[int]], **info: Any) -> int:
        self.nodes.append(Node(len(self.nodes), kind, name, inputs, info))
        return len(self.nodes) - 1

    # -------------------------------------------------------------------- the hook
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        try:
            self._record(func, args, kwargs, out)
        except Exception as exc:  # noqa: BLE001 - tracing must never change what the model does
            log.debug("trace: could not record %s (%s)", _fname(func), exc)
        return out

    def _record(self, func, args, kwargs, out) -> None:
        name = _fname(func)
        operands = [t for a in args for t in tensors_in(a)] + \
                   [t for v in kwargs.values() for t in tensors_in(v)]
        provs = [self.prov(t) for t in operands]
        if func in _LAYER_FUNCS and len(args) >= 2 and id(args[1]) in self.layers:
            x = args[0]
            rows = x.numel() // max(args[1].shape[1] if func is F.linear else 1, 1)
            nid = self._node("layer", self.layers[id(args[1])], [self.prov(x)], rows=int(rows),
                             lead=int(x.shape[0]) if x.ndim else 1,
                             call=len(self.nodes))
        elif name == "scaled_dot_product_attention":
            q = args[0] if args else kwargs.get("query")
            k = args[1] if len(args) > 1 else kwargs.get("key")
            v = args[2] if len(args) > 2 else kwargs.get("value")
            nid = self._node("attn", name, [self.prov(q), self.prov(k), self.prov(v)],
                             q_len=int(q.shape[-2]), k_len=int(k.shape[-2]))
        elif name in _SOFTMAX:
            nid = self._node("softmax", name, provs[:1])
        elif name in _MATMUL:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else ()
            nid = self._node("matmul", name, provs[:2], shape=shape)
            self._maybe_attention(nid)
        elif name in _ACTS:
            nid = self._node("act", name, provs[:1])
        elif name in _NORMS:
            nid = self._node("norm", name, provs[:1])
        else:
            if name in _MUL and len(provs) >= 2:
                self.mul_pairs.append((provs[0], provs[1]))
            self._set(out, frozenset().union(*provs) if provs else frozenset())
            return
        self._set(out, frozenset({nid}))

    def _maybe_attention(self, nid: int) -> None:
        """A product taking a softmax of an earlier product is the output of an attention."""
        node = self.nodes[nid]
        for side, p in enumerate(node.inputs):
            soft = [i for i in p if self.nodes[i].kind == "softmax"]
            if not soft:
                continue
            scores = [i for i in self.nodes[soft[0]].inputs[0] if self.nodes[i].kind == "matmul"] \
                if self.nodes[soft[0]].inputs else []
            if not scores:
                continue
            sc = self.nodes[scores[0]]
            shape = sc.info.get("shape", ())
            node.kind = "attn"
            v = node.inputs[1 - side] if len(node.inputs) > 1 else frozenset()
            qk = sc.inputs + [frozenset()] * (2 - len(sc.inputs))
            node.inputs = [qk[0], qk[1], v]
            node.info.update(q_len=int(shape[-2]) if len(shape) >= 2 else -1,
                             k_len=int(shape[-1]) if len(shape) >= 2 else -1, manual=True)
            return


def trace_call(module: nn.Module, call: Any, names: dict[int, str]) -> FlowTrace:
    """Run ``call()`` (one forward of ``module``) under a :class:`FlowTrace`."""
    tr = FlowTrace(names)
    with torch.no_grad(), tr:
        call()
    return tr
