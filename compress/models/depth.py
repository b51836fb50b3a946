"""Depth pruning: physical removal of whole transformer blocks, and a context that skips them.

Blocks are named as ``adapter.blocks`` names them ("transformer_blocks.3", "stages.a.1"). A
removal rebuilds each affected container without the blocks (no weight is copied), renumbers
what is left where the container is numbered, and, for diffusers models, updates the config so
that the stock class rebuilds exactly the pruned architecture from it.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

from torch import nn

from compress.errors import UserError
from compress.models.base import FamilyAdapter

_CONTAINERS = (nn.ModuleList, nn.Sequential, nn.ModuleDict)
# Config keys that list block indices of one block list (diffusers 0.42.1): SD3.5's blocks with
# a second self-attention. Surviving indices must follow their blocks, removed ones go.
_INDEX_KEYS = {"dual_attention_layers": "transformer_blocks"}


def _generic(adapter: FamilyAdapter) -> bool:
    return adapter.name == "generic"


def _get(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path) if path else root
    except AttributeError:
        return None


def _set(root: nn.Module, path: str, module: nn.Module) -> None:
    if not path:  # the root itself is the container (an nn.Sequential model): it cannot be
        root.__dict__["_modules"] = module._modules  # replaced, its child table can
        return
    owner, _, attr = path.rpartition(".")
    setattr(_get(root, owner), attr, module)


def _group(names: list[str]) -> dict[str, list[str]]:
    """{container path: [child keys to drop]} in first-seen order."""
    out: dict[str, list[str]] = {}
    for n in names:
        parent, _, key = n.rpartition(".")
        out.setdefault(parent, []).append(key)
    return out


def _why_not(transformer: nn.Module, adapter: FamilyAdapter, name: str) -> str | None:
    """Why block ``name`` may not be removed, or None when it may."""
    parent, _, key = name.rpartition(".")
    if adapter.name == "sd3" and parent == "transformer_blocks" \
            and key == str(len(transformer.transformer_blocks) - 1):
        return ("it is SD3's last block (diffusers builds it with context_pre_only=True, its "
                "weights have other shapes than the others')")
    container = _get(transformer, parent)
    if not isinstance(container, _CONTAINERS):
        # a block held as a plain attribute: nothing could stand in for it in the forward
        return f"it is not held in a ModuleList, Sequential or ModuleDict ({parent or 'root'})"
    return None


def removable(transformer: nn.Module, adapter: FamilyAdapter) -> list[str]:
    """Block names (as adapter.blocks gives them) that may be removed. SD3: never the last block of
    transformer_blocks (diffusers builds it with context_pre_only=True, its weights have other
    shapes), so it is excluded. All families and generic: every other block (generic: held in a
    ModuleList, Sequential or ModuleDict)."""
    return [n for n, _ in adapter.blocks(transformer) if _why_not(transformer, adapter, n) is None]


def check_removal(transformer: nn.Module, adapter: FamilyAdapter, names: list[str]) -> None:
    """Raise compress.errors.UserError (one line: what, which names, what to do) when a name is not
    a block (list the first few valid names), is listed twice, is not removable (say why, e.g.
    SD3's last block), or when the removal would leave a block list (per list attribute; for
    generic per container) with no block at all."""
    valid = [n for n, _ in adapter.blocks(transformer)]
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise UserError(f"depth: {unknown[:3]} not blocks of this model (blocks: {valid[:4]}, "
                        f"{len(valid)} in all); name blocks as adapter.blocks lists them")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UserError(f"depth: {twice[:3]} listed more than once; list each block once")
    for n in names:
        why = _why_not(transformer, adapter, n)
        if why:
            raise UserError(f"depth: block {n} cannot be removed: {why}; remove other blocks")
    for parent, keys in _group(names).items():
        if all(b in names for b in valid if b.rpartition(".")[0] == parent):
            raise UserError(f"depth: removing {keys} would leave {parent or 'the model'} with "
                            "no block; keep at least one block in every block list")


def _without(container: nn.Module, drop: set[str]) -> tuple[nn.Module, dict[str, str]]:
    """A new container holding the same modules minus ``drop``, and {old key: new key}.

    A shallow copy keeps the container's class, hooks and training flag; only its child table
    is new, so the original stays intact (``without_blocks`` puts it back)."""
    keys = list(container._modules)
    numbered = isinstance(container, nn.ModuleList) or (
        isinstance(container, nn.Sequential) and keys == [str(i) for i in range(len(keys))])
    kept = [k for k in keys if k not in drop]
    rename = {k: (str(i) if numbered else k) for i, k in enumerate(kept)}
    new = copy.copy(container)
    new.__dict__["_modules"] = OrderedDict((rename[k], container._modules[k]) for k in kept)
    return new, rename


def _swap(transformer: nn.Module, names: list[str],
          saved: list[tuple[str, nn.Module]]) -> dict[str, str | None]:
    """Put containers without ``names`` in place, appending (path, old container) to ``saved``
    as it goes (so a caller can undo a partial swap); returns {old child path: new child path,
    or None when removed}."""
    moved: dict[str, str | None] = {}
    for parent, keys in _group(names).items():
        old = _get(transformer, parent)
        missing = [k for k in keys if k not in old._modules]
        if missing:
            raise UserError(f"depth: {parent} has no member {missing[0]!r}; rebuild the model "
                            "that was pruned before restoring")
        new, rename = _without(old, set(keys))
        # the root is changed in place: keep a shallow copy holding its original child table
        saved.append((parent, old if parent else copy.copy(old)))
        _set(transformer, parent, new)
        at = f"{parent}." if parent else ""
        moved.update({at + k: None for k in keys})
        moved.update({at + k: at + v for k, v in rename.items()})
    return moved


def _rename(name: str, moved: dict[str, str | None]) -> str | None:
    """``name`` after the moves (a child path or anything under it); None when removed."""
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        head = ".".join(parts[:i])
        if head in moved:
            new = moved[head]
            return None if new is None else ".".join([new, *parts[i:]])
    return name


def _renamed_structure(st: Any, moved: dict[str, str | None]) -> Any:
    """A new Structure (the old one may be shared with a deep copy, see share_structure)."""
    def names(xs: list[str]) -> list[str]:
        return [y for y in (_rename(x, moved) for x in xs) if y is not None]

    def keyed(d: dict[str, str]) -> dict[str, str]:
        return {y: v for k, v in d.items() if (y := _rename(k, moved)) is not None}

    return dataclasses.replace(st, blocks=names(st.blocks), stacks=names(st.stacks),
                               roles=keyed(st.roles), reasons=keyed(st.reasons))


def _apply(transformer: nn.Module, adapter: FamilyAdapter, names: list[str]) -> dict:
    """Remove ``names`` (already checked), update config or structure cache, return the meta."""
    from compress.models.generic import _STRUCTURES, structure_of

    st = structure_of(transformer) if _generic(adapter) else None  # before the names change
    order = [n for n, _ in adapter.blocks(transformer)]
    moved = _swap(transformer, names, [])
    if _generic(adapter):
        _STRUCTURES[transformer] = _renamed_structure(st, moved)
        counts = {p: len(_get(transformer, p)) for p in _group(names)}
    else:
        counts = {a: len(getattr(transformer, a)) for a in adapter.block_lists
                  if getattr(transformer, a, None) is not None}
        update: dict[str, Any] = {adapter.layer_config_keys[a]: n for a, n in counts.items()
                                  if a in adapter.layer_config_keys}
        for key, attr in _INDEX_KEYS.items():
            if key in transformer.config and transformer.config[key] is not None:
                new = (_rename(f"{attr}.{i}", moved) for i in transformer.config[key])
                update[key] = tuple(int(n.rpartition(".")[2]) for n in new if n is not None
                                    and _get(transformer, n) is not None)
        used = transformer.config.get("_use_default_values")
        if used is not None:  # from_config would put a listed key's default back
            update["_use_default_values"] = [k for k in used if k not in update]
        transformer.register_to_config(**update)
    removed = set(names)
    return {"removed": [n for n in order if n in removed],
            "kept": [n for n in order if n not in removed], "counts": counts}


def remove_blocks(transformer: nn.Module, adapter: FamilyAdapter, names: list[str]) -> dict:
    """Physically remove the named blocks (in place): the container is rebuilt without them, the
    remaining blocks renumbered (state_dict keys become e.g. transformer_blocks.0..N-1). For
    diffusers families update the model config with ``transformer.register_to_config(...)`` so
    that ``type(transformer).from_config(transformer.config)`` builds exactly the pruned
    architecture: the layer_config_keys counts (num_layers; Flux num_layers and
    num_single_layers), and SD3's ``dual_attention_layers`` (surviving indices remapped to their
    new positions, removed ones dropped). No other per-block config exists in diffusers 0.42.1
    for DiT, PixArt, SD3, Flux or Sana. Generic modules: the cached structure is renamed.
    Returns JSON-able meta: {"removed": [names in original numbering], "kept": [original names of
    the remaining blocks, in order], "counts": {list attr or container: new count}}."""
    check_removal(transformer, adapter, names)
    return _apply(transformer, adapter, list(names))


def restore_removed(transformer: nn.Module, adapter: FamilyAdapter, meta: dict) -> None:
    """On a freshly built skeleton (possibly on the meta device, built with init_empty_weights):
    for diffusers families, if the skeleton was built from the updated config it already has the
    pruned block counts -> verify the counts match meta["counts"] and do nothing; if it has the
    original counts, remove meta["removed"] like remove_blocks does. For generic modules (the
    user's freshly built original instance) remove meta["removed"]. Raise UserError when the
    skeleton matches neither."""
    removed = [str(n) for n in meta.get("removed", [])]
    pruned = {str(k): int(v) for k, v in meta.get("counts", {}).items()}
    drop = _group(removed)
    original = {p: n + len(drop.get(p, [])) for p, n in pruned.items()}
    have = {}
    for p in pruned:
        c = _get(transformer, p)
        have[p] = len(c) if isinstance(c, _CONTAINERS) else None
    if have == pruned:
        return  # built from the pruned config (or nothing was removed)
    if have != original or set(drop) - set(pruned):
        raise UserError(f"depth: the model's block counts {have} match neither the pruned "
                        f"{pruned} nor the original {original} architecture; build the model "
                        "from the config it was pruned from (or the pruned one)")
    _apply(transformer, adapter, removed)


@contextlib.contextmanager
def without_blocks(transformer: nn.Module, adapter: FamilyAdapter,
                   names: list[str]) -> Iterator[None]:
    """Temporarily run the model with the named blocks skipped: swap each affected container for
    one without them, yield, and put the original containers back (also on exceptions). No
    config change, no copies of weights. Used to score 'what if block i were removed'."""
    from compress.models.generic import _STRUCTURES

    # check_removal may analyse a generic module never analysed: that structure (of the whole
    # model) stays cached while inside, so the cache is put back as it was only on the way out
    cached = _STRUCTURES.get(transformer)
    saved: list[tuple[str, nn.Module]] = []
    try:
        check_removal(transformer, adapter, names)
        _swap(transformer, list(names), saved)
        yield
    finally:
        for path, old in reversed(saved):
            _set(transformer, path, old)
        if cached is None:
            _STRUCTURES.pop(transformer, None)
