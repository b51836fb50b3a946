"""Width pruning: physical removal of attention heads and feed-forward hidden channels.

Units are named by the module they prune ("transformer_blocks.3.attn1", "transformer_blocks.3.ff",
"single_transformer_blocks.0.mlp"; see :mod:`compress.models.width_units`). A removal keeps the
listed heads or channels of each unit: every affected Linear/Conv is replaced by a smaller copy
holding the kept rows (outputs) or columns (inputs), norms spanning all heads are sliced, and the
attributes the forward pass reads (``Attention.heads``, ``inner_dim``, a user module's ``heads``)
follow. For a diffusers model the config is updated only when the stock class rebuilds exactly
the pruned shapes from it (checked on a meta-device skeleton); otherwise the config stays as it
was and :func:`restore` replays the removal on a skeleton built from it.

Removing heads or channels computes exactly what the original computes with their contribution
zeroed at the out-projection (softmax and Sana's linear attention normalise per head, GLUMBConv's
depthwise conv and gate work per channel), unless a unit's ``exact`` is False (a q/k norm across
all heads, whose statistic changes).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any

import torch
from torch import nn

from compress.errors import UserError
from compress.models.base import FamilyAdapter
from compress.models.width_units import Unit, diffusers_units, generic_units

__all__ = ["STOCK_EXPRESSIBLE", "Unit", "remove", "restore", "stock_expressible", "units"]

# What reloads with the stock class's from_pretrained after a removal (diffusers 0.42.1; checked
# by tests/test_width_remove.py). In DiT, PixArt, SD3, FLUX and Sana the model width is
# num_attention_heads x attention_head_dim, so no config key can express fewer self-attention
# heads; feed-forward widths are fixed multiples of the width except where listed.
STOCK_EXPRESSIBLE: dict[str, str] = {
    "dit": "nothing: heads set the model width, the feed-forward is always 4 x width; "
           "pruned models reload through restore()",
    "pixart": "nothing: heads (self and cross) set the model width, the feed-forward is always "
              "4 x width; pruned models reload through restore()",
    "sd3": "nothing: heads set the model width, ff and ff_context are always 4 x width; "
           "pruned models reload through restore()",
    "flux": "nothing: heads set the model width, ff/ff_context are 4 x width and the single "
            "blocks' mlp_ratio is not a config key; pruned models reload through restore()",
    "sana": "cross-attention heads when every attn2 keeps the same count "
            "(num_cross_attention_heads) and GLUMBConv channels when every ff keeps the same "
            "count that int(mlp_ratio x width) reproduces (mlp_ratio); self-attention heads "
            "(they set the width) reload through restore()",
    "generic": "no config: the user's freshly built module is pruned again by restore()",
}


def stock_expressible(family: str) -> str:
    """One line: which width removals of ``family`` reload with the stock from_pretrained."""
    return STOCK_EXPRESSIBLE.get(family, "unknown family: reload through restore()")


def units(transformer: nn.Module, adapter: FamilyAdapter,
          head_counts: dict[str, int] | None = None) -> list[Unit]:
    """Every prunable attention (heads) and feed-forward (channels) of the model's blocks, in
    block order. A user's module: a head count comes from ``head_counts`` ({module name, unit
    name or "re:regex" over module names: heads}, the recipe's ``prune_width.heads``), else from
    an attribute (heads, num_heads, ..., or a head width: head_dim, ...) on the module holding
    the attention's layers or above it up to the block; UserError when none says it."""
    if adapter.name == "generic":
        return generic_units(transformer, adapter, dict(head_counts or {}))
    return diffusers_units(transformer, adapter)


# ----------------------------------------------------------------------------- checks


def _check_keep(found: dict[str, Unit], keep: dict[str, list[int]]) -> dict[str, list[int]]:
    if not isinstance(keep, dict):
        raise UserError("width: keep must map unit names to lists of indices to keep")
    unknown = [k for k in keep if k not in found]
    if unknown:
        raise UserError(f"width: {unknown[:3]} not width units of this model (units: "
                        f"{list(found)[:4]}, {len(found)} in all); name units as units() does")
    out = {}
    for name, idx in keep.items():
        u, what = found[name], found[name].kind
        if not isinstance(idx, (list, tuple)) or \
                not all(isinstance(i, int) and not isinstance(i, bool) for i in idx):
            raise UserError(f"width: keep[{name!r}] must be a list of {what} indices")
        if not idx:
            raise UserError(f"width: keep[{name!r}] is empty; keep at least 1 of its "
                            f"{u.count} {what}")
        bad = [i for i in idx if not 0 <= i < u.count]
        if bad:
            raise UserError(f"width: keep[{name!r}] has {bad[:3]} out of range; {name} has "
                            f"{u.count} {what} (0..{u.count - 1})")
        if len(set(idx)) != len(idx):
            raise UserError(f"width: keep[{name!r}] lists an index twice; list each once")
        out[name] = sorted(idx)
    return out


# ----------------------------------------------------------------------------- slicing


def _positions(u: Unit, kept: list[int], parts: int, offset: int) -> tuple[int, int, list[int]]:
    """(start, end) of the unit's span in one dimension and the positions kept inside it."""
    seg = u.count * u.group
    pos = [offset + p * seg + i * u.group + j
           for p in range(parts) for i in kept for j in range(u.group)]
    return offset, offset + parts * seg, pos


def _plan(tr: nn.Module, todo: list[Unit], keep: dict[str, list[int]]) -> dict:
    """{(module, axis): kept indices} over all units: axis "out" (rows), "in" (columns) or
    "sized" (a norm's parameters); units sharing a layer (FLUX proj_out) each own their span."""
    spans: dict[tuple[str, str], list[tuple[int, int, list[int]]]] = {}
    for u in todo:
        for layer in u.outputs:
            spans.setdefault((layer, "out"), []).append(
                _positions(u, keep[u.name], u.parts.get(layer, 1), 0))
        for layer in u.inputs:
            spans.setdefault((layer, "in"), []).append(
                _positions(u, keep[u.name], 1, u.offset.get(layer, 0)))
        for norm in u.sized:
            spans.setdefault((norm, "sized"), []).append(_positions(u, keep[u.name], 1, 0))
    plan = {}
    for (name, axis), parts in spans.items():
        size = _size(tr, name, axis)
        mask = [True] * size
        for start, end, pos in parts:
            if end > size:
                raise UserError(f"width: {name} has {size} {'rows' if axis != 'in' else 'columns'}"
                                f", fewer than its unit spans ({end}); the model does not match")
            mask[start:end] = [False] * (end - start)
            for p in pos:
                mask[p] = True
        plan[(name, axis)] = [i for i, k in enumerate(mask) if k]
    return plan


def _size(tr: nn.Module, name: str, axis: str) -> int:
    m = _get(tr, name)
    return m.weight.shape[1 if axis == "in" else 0]


def _get(tr: nn.Module, name: str) -> nn.Module:
    try:
        return tr.get_submodule(name)
    except AttributeError:
        raise UserError(f"width: the model has no module {name}; build the model that was "
                        "pruned (same class and config) before restoring") from None


def _take(t: torch.Tensor, dim: int, idx: list[int]) -> torch.Tensor:
    if t.is_meta:
        shape = list(t.shape)
        shape[dim] = len(idx)
        return torch.empty(shape, dtype=t.dtype, device="meta")
    return t.detach().index_select(dim, torch.tensor(idx, device=t.device)).clone()


def _param(t: torch.Tensor, like: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=like.requires_grad)


def _depthwise(m: nn.Module) -> bool:
    return isinstance(m, (nn.Conv1d, nn.Conv2d)) and m.groups > 1 and \
        m.groups == m.in_channels == m.out_channels


def _check_layer(tr: nn.Module, name: str) -> None:
    m = _get(tr, name)
    if not isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) or list(m.children()) or \
            set(m._parameters) - {"weight", "bias"}:
        raise UserError(f"width: {name} is a {type(m).__name__}, not a plain Linear/Conv; "
                        "prune width before passes that replace layers (quantisation, LoRA)")
    if isinstance(m, (nn.Conv1d, nn.Conv2d)) and m.groups > 1 and not _depthwise(m):
        raise UserError(f"width: {name} is a grouped conv ({m.groups} groups); not supported")


def _shrink_layer(tr: nn.Module, name: str, rows: list[int] | None,
                  cols: list[int] | None) -> None:
    """Replace layer ``name`` by a copy holding only ``rows`` (outputs) and ``cols`` (inputs)."""
    old = _get(tr, name)
    new = copy.copy(old)  # same class, flags and attributes; parameters of its own
    new._parameters = dict(old._parameters)
    w = old.weight
    conv, depthwise = isinstance(old, (nn.Conv1d, nn.Conv2d)), _depthwise(old)
    if rows is not None:
        w = _take(w, 0, rows)
        if old.bias is not None:
            new.bias = _param(_take(old.bias, 0, rows), old.bias)
    if cols is not None and not depthwise:
        w = _take(w, 1, cols)
    new.weight = _param(w, old.weight)
    if conv:
        new.out_channels = w.shape[0]
        new.in_channels = w.shape[0] if depthwise else w.shape[1]
        if depthwise:
            new.groups = w.shape[0]
    else:
        new.out_features, new.in_features = w.shape
    blocks = getattr(old, "_tp_packed_row_blocks", None)  # FLUX proj_out: [attention, mlp]
    if cols is not None and isinstance(blocks, list):
        starts = [sum(blocks[:i]) for i in range(len(blocks))]
        new._tp_packed_row_blocks = [sum(s <= c < s + n for c in cols)
                                     for s, n in zip(starts, blocks)]
    owner, _, attr = name.rpartition(".")
    setattr(_get(tr, owner) if owner else tr, attr, new)


def _shrink_norm(tr: nn.Module, name: str, idx: list[int]) -> None:
    m = _get(tr, name)
    size = None
    for pname, p in list(m.named_parameters(recurse=False)):
        size = p.shape[0]
        setattr(m, pname, _param(_take(p, 0, idx), p))
    if getattr(m, "normalized_shape", None) == (size,):
        m.normalized_shape = (len(idx),)
    if isinstance(getattr(m, "dim", None), torch.Size) and tuple(m.dim) == (size,):
        m.dim = torch.Size((len(idx),))


def _set_count(tr: nn.Module, u: Unit, new: int) -> None:
    if u.owner is None or u.attr is None:
        return
    m = _get(tr, u.owner)
    old = getattr(m, u.attr)
    setattr(m, u.attr, new)
    if u.kind != "heads":
        return
    for attr in ("inner_dim", "inner_kv_dim", "all_head_size"):
        if getattr(m, attr, None) == old * u.group:
            setattr(m, attr, new * u.group)
    if getattr(m, "sliceable_head_dim", None) == old:
        m.sliceable_head_dim = new


def _apply(tr: nn.Module, todo: list[Unit], keep: dict[str, list[int]]) -> None:
    plan = _plan(tr, todo, keep)
    layers = sorted({name for name, axis in plan if axis != "sized"})
    for name in layers:  # every check before the first change
        _check_layer(tr, name)
    for name in layers:
        _shrink_layer(tr, name, plan.get((name, "out")), plan.get((name, "in")))
    for (name, axis), idx in plan.items():
        if axis == "sized":
            _shrink_norm(tr, name, idx)
    for u in todo:
        _set_count(tr, u, len(keep[u.name]))


# ----------------------------------------------------------------------------- config


def _candidate_config(tr: nn.Module, adapter: FamilyAdapter) -> dict[str, Any]:
    """Config keys that could express the model's current widths (checked by the caller)."""
    update: dict[str, Any] = {}
    if adapter.name != "sana":
        return update
    now = units(tr, adapter)
    cross = {u.count for u in now if u.name.endswith(".attn2")}
    if len(cross) == 1:
        update["num_cross_attention_heads"] = cross.pop()
    ff = {u.count for u in now if u.kind == "channels"}
    if len(ff) == 1:
        hidden = ff.pop()
        dim = int(tr.config["num_attention_heads"]) * int(tr.config["attention_head_dim"])
        ratio = hidden / dim
        for _ in range(4):  # int(ratio * dim) must give hidden back: nudge up past round-off
            if int(ratio * dim) == hidden:
                update["mlp_ratio"] = ratio
                break
            ratio = math.nextafter(ratio, math.inf)
    return update


def _shapes(m: nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


def _with_defaults_note(tr: nn.Module, update: dict[str, Any]) -> dict[str, Any]:
    """``update`` plus, when the config lists keys left at their defaults, that list without
    the updated keys (from_config would otherwise put the defaults back in their place)."""
    used = tr.config.get("_use_default_values")
    if not update or used is None:
        return dict(update)
    return {**update, "_use_default_values": [k for k in used if k not in update]}


def _stock_update(tr: nn.Module, adapter: FamilyAdapter) -> dict[str, Any] | None:
    """The config update under which the stock class builds exactly ``tr``'s shapes, or None."""
    from accelerate import init_empty_weights

    config = getattr(tr, "config", None)
    if config is None or not hasattr(type(tr), "from_config"):
        return None
    update = {k: v for k, v in _candidate_config(tr, adapter).items() if config.get(k) != v}
    try:
        with init_empty_weights():
            skeleton = type(tr).from_config({**dict(config), **_with_defaults_note(tr, update)})
    except Exception:  # noqa: BLE001 - a config the class refuses expresses nothing
        return None
    return update if _shapes(skeleton) == _shapes(tr) else None


# ----------------------------------------------------------------------------- public


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def remove(transformer: nn.Module, adapter: FamilyAdapter, keep: dict[str, list[int]],
           head_counts: dict[str, int] | None = None) -> dict:
    """Keep only the listed heads/channels of each named unit (others untouched), in place.

    ``keep``: {unit name: indices to keep}, at least one per unit, each index once. Layers are
    replaced by smaller copies (same dtype and device), attributes the forward reads follow.
    A diffusers config is updated (``register_to_config``) only when the stock class then builds
    the pruned shapes, so ``type(tr).from_config(tr.config)`` is the pruned model; otherwise it
    is left as it was and ``stock_loadable`` is False (reload through :func:`restore`).
    Returns JSON-able meta: keep, counts_before, counts_after, stock_loadable, config (the keys
    changed), params_before, params_after, and for restore the touched units and the shapes of
    their parameters before and after; inexact lists units whose kept elements now compute
    something else (see Unit.exact).
    """
    found = {u.name: u for u in units(transformer, adapter, head_counts)}
    keep = _check_keep(found, keep)
    todo = [found[n] for n in found if n in keep]
    before, shapes = _params(transformer), _touched_shapes(transformer, todo)
    _apply(transformer, todo, keep)
    changed = any(len(keep[u.name]) != u.count for u in todo)
    update = None if adapter.name == "generic" else _stock_update(transformer, adapter)
    if update:
        transformer.register_to_config(**_with_defaults_note(transformer, update))
    return {
        "keep": {u.name: keep[u.name] for u in todo},
        "counts_before": {u.name: u.count for u in todo},
        "counts_after": {u.name: len(keep[u.name]) for u in todo},
        "stock_loadable": update is not None or not changed,
        "config": dict(update or {}),
        "params_before": before,
        "params_after": _params(transformer),
        "units": {u.name: dataclasses.asdict(u) for u in todo},
        "shapes_before": shapes,
        "shapes_after": _touched_shapes(transformer, todo),
        "inexact": [u.name for u in todo if not u.exact and len(keep[u.name]) != u.count],
    }


def _touched_shapes(tr: nn.Module, todo: list[Unit]) -> dict[str, list[int] | None]:
    """{parameter name: shape (None when missing)} of every module the units shrink, and
    {"owner#attr": [count]} for the attributes holding their counts."""
    out: dict[str, list[int] | None] = {}
    for u in todo:
        for name in (*u.outputs, *u.inputs, *u.sized):
            try:
                m = tr.get_submodule(name)
            except AttributeError:
                out[name] = None
                continue
            for p, t in m.named_parameters(recurse=False):
                out[f"{name}.{p}"] = list(t.shape)
        if u.owner is not None and u.attr is not None:  # the count the forward reads
            try:
                out[f"{u.owner}#{u.attr}"] = [int(getattr(tr.get_submodule(u.owner), u.attr))]
            except AttributeError:
                out[f"{u.owner}#{u.attr}"] = None
    return out


def restore(transformer: nn.Module, adapter: FamilyAdapter, meta: dict) -> None:
    """Give a freshly built skeleton (possibly on the meta device) the pruned shapes so that the
    pruned state dict loads. Built from the updated config (or already pruned): verify and do
    nothing; built from the original config (a user's module: its original instance): remove
    again what meta says. Raises UserError when the skeleton matches neither."""
    todo = [Unit(**d) for d in meta.get("units", {}).values()]
    keep = {str(k): [int(i) for i in v] for k, v in meta.get("keep", {}).items()}
    have = _touched_shapes(transformer, todo)
    if have == meta.get("shapes_after"):
        return
    if have != meta.get("shapes_before"):
        diff = [k for k, v in have.items() if v != meta.get("shapes_before", {}).get(k)]
        raise UserError(f"width: the model's shapes match neither the pruned nor the original "
                        f"architecture (first at {diff[:1]}: {have[diff[0]] if diff else None}); "
                        "build the model from the config it was pruned from (or the pruned one)")
    _apply(transformer, todo, keep)
    update = meta.get("config") or {}
    if update and hasattr(transformer, "register_to_config"):
        transformer.register_to_config(**_with_defaults_note(transformer, update))
