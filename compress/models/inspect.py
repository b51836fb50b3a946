"""What `dit-compress inspect MODEL` shows: family, blocks, parameters per role, weight layers."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from torch import nn

from compress.models.base import ROLES, ModelHandle


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _own_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters(recurse=False))


def inspect_model(handle: ModelHandle) -> dict[str, Any]:
    """A JSON-able description of the handle's transformer.

    Keys: family, class, source, dtype, params, blocks (name, class, params), block_lists
    (attribute -> count), params_per_role (every role plus "other" for role-less weight
    layers and "non_layer" for norms, tables and other parameters), layers (name, type, role,
    shape).
    """
    tr = handle.transformer
    adapter = handle.adapter
    total = _params(tr)
    blocks = [
        {"name": name, "class": type(b).__name__, "params": _params(b)}
        for name, b in adapter.blocks(tr)
    ]
    lists = Counter(b["name"].rsplit(".", 1)[0] for b in blocks)
    per_role = dict.fromkeys((*ROLES, "other"), 0)
    layers = []
    reasons = {}
    if adapter.name == "generic":
        from compress.models.generic import structure_of

        reasons = structure_of(tr).reasons
    for name, mod, role in adapter.weight_layers(tr):
        per_role[role] = per_role.get(role, 0) + _own_params(mod)
        layers.append(
            {
                "name": name,
                "type": type(mod).__name__,
                "role": role,
                "shape": list(mod.weight.shape),
                **({"reason": reasons[name]} if name in reasons else {}),
            }
        )
    per_role["non_layer"] = total - sum(per_role.values())
    dtypes = Counter(str(p.dtype).replace("torch.", "") for p in tr.parameters())
    return {
        "family": adapter.name,
        "class": type(tr).__name__,
        "source": None if handle.source is None else str(handle.source),
        "dtype": dtypes.most_common(1)[0][0] if dtypes else None,
        "params": total,
        "block_lists": dict(lists),
        "blocks": blocks,
        "params_per_role": per_role,
        "layers": layers,
    }


def _human(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def _grouped_layers(d: dict[str, Any]) -> list[tuple[str, str, str, str, str, str]]:
    """Layers with block indices folded: a layer found with the same type, role and shape in
    every block of its list becomes one row named ``list.*.rest``; one found in some blocks
    only, or with differing shapes, gets one row per variant naming its block indices."""
    sizes = d["block_lists"]
    lists = "|".join(re.escape(k) for k in sorted(sizes, key=len, reverse=True)) or r"(?!)"
    fold = re.compile(rf"^({lists})\.(\d+)\.(.*)$")
    groups: dict[tuple, list[int]] = {}
    order: list[tuple] = []
    for layer in d["layers"]:
        m = fold.match(layer["name"])
        shape = "x".join(str(s) for s in layer["shape"])
        key = (m.group(1), m.group(3)) if m else (None, layer["name"])
        variant = (*key, layer["type"], layer["role"], shape, layer.get("reason", ""))
        if variant not in groups:
            groups[variant] = []
            order.append(variant)
        groups[variant].append(int(m.group(2)) if m else -1)
    rows = []
    for lst, rest, typ, role, shape, reason in order:
        idx = groups[(lst, rest, typ, role, shape, reason)]
        if lst is None:
            rows.append((rest, typ, role, shape, "", reason))
        elif len(idx) == sizes[lst] and len(set(idx)) == len(idx):
            rows.append((f"{lst}.*.{rest}", typ, role, shape, f"x{len(idx)}", reason))
        else:
            rows.append((f"{lst}.[{_ranges(idx)}].{rest}", typ, role, shape, f"x{len(idx)}",
                         reason))
    return rows


def _ranges(idx: list[int]) -> str:
    idx = sorted(set(idx))
    parts, start = [], idx[0]
    for a, b in zip(idx, idx[1:] + [None]):
        if b != a + 1:
            parts.append(str(start) if start == a else f"{start}-{a}")
            start = b
    return ",".join(parts)


def format_inspect(d: dict[str, Any]) -> str:
    """Plain-text view of :func:`inspect_model`'s result for the terminal."""
    total = max(d["params"], 1)
    out = [
        f"model     {d['source'] or '(in memory)'}",
        f"family    {d['family']} ({d['class']}, {d['dtype']})",
        f"params    {_human(d['params'])} ({d['params']:,})",
        "blocks    "
        + (", ".join(f"{k} x{n}" for k, n in d["block_lists"].items()) or "none found"),
    ]
    if d["blocks"]:
        sizes = sorted({b["params"] for b in d["blocks"]})
        per = _human(sizes[0]) if len(sizes) == 1 else f"{_human(sizes[0])}..{_human(sizes[-1])}"
        out.append(f"          {per} params per block")
    out += ["", "params per role"]
    for role, n in d["params_per_role"].items():
        if n:
            out.append(f"  {role:10s} {_human(n):>9s}  {100 * n / total:5.1f}%")
    rows = _grouped_layers(d)
    width = max((len(r[0]) for r in rows), default=10)
    head = (f"weight layers ({len(d['layers'])}; * = every block of the list, [i-j] = "
            "those blocks only)")
    out += ["", head]
    for name, typ, role, shape, count, reason in rows:
        why = f"  ({reason})" if reason else ""
        out.append(f"  {name:{width}s}  {typ:7s} {role:10s} {shape:12s} {count:4s}{why}".rstrip())
    return "\n".join(out)


def inspect_module(module: nn.Module, example_inputs: Any = None, spec: Any = None,
                   text: bool = True) -> str | dict[str, Any]:
    """:func:`inspect_model` for a user's own module, after one traced call on its inputs."""
    import copy

    from compress.models.generic import ADAPTER, analyse_module

    m = copy.deepcopy(module)
    ADAPTER.prepare(m)
    args, kwargs = None, None
    if isinstance(example_inputs, dict):
        kwargs = example_inputs
    elif isinstance(example_inputs, tuple) and len(example_inputs) == 2 and \
            isinstance(example_inputs[1], dict) and isinstance(example_inputs[0], (tuple, list)):
        args, kwargs = tuple(example_inputs[0]), example_inputs[1]
    elif example_inputs is not None:
        args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    st = analyse_module(m, args, kwargs, spec)
    d = inspect_model(ModelHandle(transformer=m, adapter=ADAPTER))
    d["structure_notes"] = st.notes
    d["traced"] = st.traced
    return format_inspect(d) if text else d
