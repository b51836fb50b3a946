"""Module surgery: one dense feed-forward (a width unit) becomes an MoEIn / MoEOut pair.

The unit's layers (see :mod:`compress.models.width_units`) play three parts:
- layers whose output rows are per hidden channel and that read the FFN input (the first layer;
  SwiGLU's w1 and w3; Sana's 1x1 expansion conv; FLUX single blocks' proj_mlp) -> ``MoEIn``;
- per-channel layers that read the hidden channels (Sana's depthwise conv) stay, their channels
  reordered as [shared | expert 0 | ...];
- the layer whose input columns are per hidden channel (the last layer; FLUX's proj_out, whose
  attention columns go to a dense part) -> ``MoEOut``.
Reordering hidden channels changes nothing the FFN computes, so the pair with every expert
chosen is the dense FFN exactly. :func:`rebuild` makes the same modules, empty, on a skeleton
built from the original config (loading a saved output).
"""

from __future__ import annotations

import torch
from torch import nn

from compress.errors import UserError
from compress.models.width_units import Unit
from compress.modules.moe import MoEIn, MoEOut, Route, TimeContext


def _layer(tr: nn.Module, name: str) -> nn.Module:
    m = tr.get_submodule(name)
    ok = isinstance(m, nn.Linear) or (isinstance(m, (nn.Conv1d, nn.Conv2d))
                                      and set(m.kernel_size) == {1} and m.groups == 1)
    if isinstance(m, (nn.Conv1d, nn.Conv2d)) and m.groups > 1 and \
            m.groups == m.in_channels == m.out_channels:
        return m  # depthwise: reordered in place
    if not ok or set(m._parameters) - {"weight", "bias"}:
        raise UserError(f"to_moe: {name} is a {type(m).__name__}, not a plain Linear or 1x1 "
                        "conv; convert to MoE before passes that replace layers (quantisation, "
                        "LoRA, another to_moe)")
    return m


def _depthwise(m: nn.Module) -> bool:
    return isinstance(m, (nn.Conv1d, nn.Conv2d)) and m.groups > 1


def _packable(tr: nn.Module, u: Unit) -> tuple[str, str] | None:
    """(activation module name, activation) when the unit is a diffusers FeedForward whose
    ``net.0`` holds the first Linear and a known activation, and only dropouts lie between it
    and the last Linear: the MoE pair then packs the hidden values (no full-width tensor)."""
    from diffusers.models import activations as A

    try:
        ff = tr.get_submodule(u.name)
    except AttributeError:
        return None
    net = getattr(ff, "net", None)
    if not isinstance(net, nn.ModuleList) or u.outputs != [f"{u.name}.net.0.proj"]:
        return None
    last = u.inputs[0].rpartition(".")[2]
    if not last.isdigit() or not all(isinstance(m, (nn.Dropout, nn.Identity))
                                     for m in list(net)[1:int(last)]):
        return None
    a = net[0]
    kind = {A.GEGLU: "geglu", A.SwiGLU: "swiglu", A.ApproximateGELU: "approx-gelu"}.get(type(a))
    if type(a) is A.GELU:
        kind = {"none": "gelu", "tanh": "gelu-tanh"}.get(getattr(a, "approximate", None))
    elif type(a) is A.LinearActivation:
        kind = {nn.SiLU: "silu", nn.ReLU: "relu", nn.Mish: "mish"}.get(type(a.activation))
        if isinstance(a.activation, nn.GELU):
            kind = {"none": "gelu", "tanh": "gelu-tanh"}.get(a.activation.approximate)
    return (f"{u.name}.net.0", kind) if kind else None


def first_layer(tr: nn.Module, spec: dict, i: int = 0) -> nn.Module:
    """The Linear/conv of ``spec``'s i-th input layer (inside the activation module if packed)."""
    m = tr.get_submodule(spec["ins"][i]["name"])
    return m.proj if spec["ins"][i].get("act") else m


def spec_of(tr: nn.Module, u: Unit) -> dict:
    """JSON-able description of the unit's layers and shapes (what :func:`rebuild` needs)."""
    if len(u.inputs) != 1:
        raise UserError(f"to_moe: {u.name}'s hidden channels are read by {len(u.inputs)} "
                        f"layers ({u.inputs}); an MoE needs exactly one output layer")
    out = _layer(tr, u.inputs[0])
    off = u.offset.get(u.inputs[0], 0)
    if _depthwise(out) or out.weight.shape[1] != off + u.count:
        raise UserError(f"to_moe: {u.inputs[0]} reads {out.weight.shape[1]} columns, not "
                        f"{off} + the {u.count} hidden channels; not supported")
    ins, dws = [], []
    for name in u.outputs:
        m = _layer(tr, name)
        parts = u.parts.get(name, 1)
        if m.weight.shape[0] != parts * u.count:
            raise UserError(f"to_moe: {name} has {m.weight.shape[0]} rows, not {parts} x "
                            f"{u.count}")
        if _depthwise(m):
            dws.append({"name": name, "parts": parts})
        else:
            ins.append({"name": name, "parts": parts, "dim": m.weight.shape[1],
                        "bias": m.bias is not None, "conv": not isinstance(m, nn.Linear)})
    if not ins:
        raise UserError(f"to_moe: no layer of {u.name} reads the feed-forward input")
    if len({i["dim"] for i in ins}) != 1:
        raise UserError(f"to_moe: {u.name}'s first layers read different widths")
    packed = _packable(tr, u) if len(ins) == 1 and not dws and not off else None
    if packed is not None:
        ins[0].update(name=packed[0], act=packed[1])
    return {"unit": u.name, "hidden": u.count, "ins": ins, "depthwise": dws,
            "out": {"name": u.inputs[0], "offset": off, "dim": out.weight.shape[0],
                    "bias": out.bias is not None, "conv": not isinstance(out, nn.Linear),
                    "packed": packed is not None}}


def _set(tr: nn.Module, name: str, new: nn.Module) -> None:
    owner, _, attr = name.rpartition(".")
    setattr(tr.get_submodule(owner) if owner else tr, attr, new)


def _rows(parts: int, hidden: int, idx: list[int]) -> torch.Tensor:
    return torch.tensor([p * hidden + i for p in range(parts) for i in idx], dtype=torch.long)


def _build(tr: nn.Module, spec: dict, shared: int, widths: list[int], top_k: int,
           time_router: bool, ctx: TimeContext | None) -> tuple[list[MoEIn], MoEOut, Route]:
    route = Route(len(widths), top_k, ctx)
    ins = []
    for j, s in enumerate(spec["ins"]):
        old = first_layer(tr, spec, j)
        ins.append(MoEIn(s["dim"], shared, widths, s["parts"], s["bias"], route, conv=s["conv"],
                         holds_router=j == 0, time_router=time_router, act=s.get("act"),
                         device=old.weight.device, dtype=old.weight.dtype))
    o = spec["out"]
    old = tr.get_submodule(o["name"])
    out = MoEOut(o["offset"], shared, widths, o["dim"], o["bias"], route, conv=o["conv"],
                 packed=bool(o.get("packed")), device=old.weight.device,
                 dtype=old.weight.dtype)
    for m in ins:
        for lin in (m.shared, *m.experts):
            if lin is not None:
                lin.compress_role = "ff_in"
    for lin in (out.shared, *out.experts):
        if lin is not None:
            lin.compress_role = "ff_out"
    if out.rest is not None:
        out.rest.compress_role = "ff_out"
    return ins, out, route


def _flat(w: torch.Tensor) -> torch.Tensor:
    return w.reshape(w.shape[0], -1)


def convert(tr: nn.Module, spec: dict, shared_idx: list[int], groups: list[list[int]],
            top_k: int, time_router: bool, router: tuple[torch.Tensor, torch.Tensor],
            ctx: TimeContext | None) -> Route:
    """Replace the unit's layers by an MoE pair holding the same weights, hidden channels
    reordered [shared | expert 0 | ...]; ``router`` = (weight [E, D], bias [E])."""
    hidden = spec["hidden"]
    order = [*shared_idx, *(i for g in groups for i in g)]
    if sorted(order) != list(range(hidden)):
        raise ValueError("to_moe: the split must list every hidden channel exactly once")
    widths = [len(g) for g in groups]
    ins, out, route = _build(tr, spec, len(shared_idx), widths, top_k, time_router, ctx)
    with torch.no_grad():
        for j, (s, m) in enumerate(zip(spec["ins"], ins)):
            old = first_layer(tr, spec, j)
            w, b = _flat(old.weight), old.bias
            pieces = [(m.shared, shared_idx)] + list(zip(m.experts, groups))
            for lin, idx in pieces:
                if lin is None:
                    continue
                rows = _rows(s["parts"], hidden, idx).to(w.device)
                lin.weight.copy_(w.index_select(0, rows))
                if b is not None:
                    lin.bias.copy_(b.index_select(0, rows))
        ins[0].router.weight.copy_(router[0])
        ins[0].router.bias.copy_(router[1])
        if ins[0].t_router is not None:
            ins[0].t_router.weight.zero_()
            ins[0].t_router.bias.zero_()
        for d in spec["depthwise"]:
            m = tr.get_submodule(d["name"])
            rows = _rows(d["parts"], hidden, order).to(m.weight.device)
            m.weight.copy_(m.weight.index_select(0, rows))
            if m.bias is not None:
                m.bias.copy_(m.bias.index_select(0, rows))
        o = spec["out"]
        old = tr.get_submodule(o["name"])
        w, off = _flat(old.weight), o["offset"]
        if out.rest is not None:
            out.rest.weight.copy_(w[:, :off])
        for lin, idx in [(out.shared, shared_idx)] + list(zip(out.experts, groups)):
            if lin is not None:
                lin.weight.copy_(w[:, off + torch.tensor(idx, dtype=torch.long, device=w.device)])
        if out.bias is not None:
            out.bias.copy_(old.bias)
    for s, m in zip(spec["ins"], ins):
        _set(tr, s["name"], m)
    _set(tr, o["name"], out)
    return route


def rebuild(tr: nn.Module, spec: dict, shared: int, widths: list[int], top_k: int,
            time_router: bool, ctx: TimeContext | None) -> None:
    """The same MoE pair, empty (values come from the saved state dict)."""
    ins, out, _ = _build(tr, spec, shared, widths, top_k, time_router, ctx)
    for s, m in zip(spec["ins"], ins):
        _set(tr, s["name"], m)
    _set(tr, spec["out"]["name"], out)
