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
    for name, mod, role in adapter.weight_layers(tr):
        per_role[role] = per_role.get(role, 0) + _own_params(mod)
        layers.append(
            {
                "name": name,
                "type": type(mod).__name__,
                "role": role,
                "shape": list(mod.weight.shape),
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


def _grouped_layers(d: dict[str, Any]) -> list[tuple[str, str, str, str, int]]:
    """Layers with block indices folded: the same layer in every block becomes one row."""
    lists = "|".join(re.escape(k) for k in d["block_lists"]) or r"(?!)"
    fold = re.compile(rf"^({lists})\.\d+\.")
    rows: dict[tuple[str, str, str, str], int] = {}
    for layer in d["layers"]:
        key = (
            fold.sub(r"\1.*.", layer["name"]),
            layer["type"],
            layer["role"],
            "x".join(str(s) for s in layer["shape"]),
        )
        rows[key] = rows.get(key, 0) + 1
    return [(*k, n) for k, n in rows.items()]


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
    out += ["", f"weight layers ({len(d['layers'])}; * = every block of the list)"]
    for name, typ, role, shape, n in rows:
        count = f"x{n}" if n > 1 else ""
        out.append(f"  {name:{width}s}  {typ:7s} {role:10s} {shape:12s} {count}".rstrip())
    return "\n".join(out)
