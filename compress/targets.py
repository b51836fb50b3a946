"""Layer selection: by role, by fully-qualified name, or by "re:" regex.

A selector string is one of: a role name ("ff_in"), "re:<regex>" matched with re.fullmatch
against the qualified name, or anything else taken as an exact qualified name. When several
selectors of an override table match one layer, the most specific wins:
exact name > regex > role > the default.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from torch import nn

from compress.models.base import ROLES, FamilyAdapter

ALL_ROLES = (*ROLES, "other")


def _kind(sel: str) -> str:
    if sel.startswith("re:"):
        return "regex"
    if sel in ALL_ROLES:
        return "role"
    return "exact"


def matches(sel: str, name: str, role: str) -> bool:
    k = _kind(sel)
    if k == "regex":
        return re.fullmatch(sel[3:], name) is not None
    if k == "role":
        return role == sel
    return name == sel


def check_selectors(selectors: Iterable[str], names: set[str], what: str) -> None:
    """Fail loudly on a regex that does not compile or an exact name that is not in the model."""
    from compress.errors import UserError

    for sel in selectors:
        k = _kind(sel)
        if k == "regex":
            try:
                re.compile(sel[3:])
            except re.error as exc:
                raise UserError(f"{what}: bad regex {sel!r}: {exc}") from None
        elif k == "exact" and sel not in names:
            raise UserError(
                f"{what}: {sel!r} is neither a role ({', '.join(ALL_ROLES)}) nor a layer name of "
                "this model (run `dit-compress inspect MODEL` for the names)"
            )


def select(
    adapter: FamilyAdapter,
    transformer: nn.Module,
    include: list[str],
    exclude: list[str] | None = None,
    types: tuple[type, ...] = (nn.Linear,),
) -> list[tuple[str, nn.Module, str]]:
    """(name, module, role) of every layer of ``types`` matched by include and not by exclude."""
    exclude = exclude or []
    layers = [(n, m, r) for n, m, r in adapter.weight_layers(transformer) if isinstance(m, types)]
    names = {n for n, _, _ in layers}
    check_selectors(include, names, "include")
    check_selectors(exclude, names, "exclude")
    return [
        (n, m, r)
        for n, m, r in layers
        if any(matches(s, n, r) for s in include) and not any(matches(s, n, r) for s in exclude)
    ]


_RANK = {"exact": 3, "regex": 2, "role": 1}


def resolve(table: dict[str, Any], name: str, role: str) -> Any | None:
    """The value of the most specific selector in ``table`` matching the layer, else None."""
    best, best_rank = None, 0
    for sel, val in table.items():
        if matches(sel, name, role) and _RANK[_kind(sel)] > best_rank:
            best, best_rank = val, _RANK[_kind(sel)]
    return best


def check_in_model(transformer: nn.Module, pass_name: str, types: tuple[type, ...],
                   groups: dict[str, list[str]]) -> None:
    """Before any work: every exact name and regex among a pass's selectors names a layer of
    ``types`` in this model (one line naming the key, the selector and the nearest name)."""
    import difflib

    from compress.errors import UserError

    kinds = "/".join(t.__name__ for t in types)
    names = [n for n, m in transformer.named_modules() if isinstance(m, types)]
    known = set(names)
    for what, sels in groups.items():
        for sel in sels:
            if sel.startswith("re:"):
                pat = re.compile(sel[3:])
                if not any(pat.fullmatch(n) for n in names):
                    raise UserError(f"{pass_name}.{what}: {sel!r} matches no {kinds} layer of "
                                    "this model (`dit-compress inspect MODEL` lists them)")
            elif sel not in ALL_ROLES and sel not in known:
                near = difflib.get_close_matches(sel, [*ALL_ROLES, *names], n=1)
                hint = f"; did you mean {near[0]!r}?" if near else ""
                raise UserError(f"{pass_name}.{what}: {sel!r} is neither a role "
                                f"({', '.join(ALL_ROLES)}) nor a {kinds} layer of this "
                                f"model{hint}")
