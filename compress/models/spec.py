"""ModelSpec: a user's word on where the blocks are and what a layer does, when inference errs."""

from __future__ import annotations

from pydantic import Field, field_validator

from compress.config import StrictModel, check_selectors
from compress.models.base import ROLES

_ROLES = (*ROLES, "other")


class ModelSpec(StrictModel):
    """Blocks and roles of a user's own module, overriding what dit-compress finds.

    ``blocks``: containers whose children are the blocks (``"trunk.cells"``), single block
    modules, or ``"re:"`` regexes of block names; in execution order. ``roles``: layer selector
    (exact qualified name or ``"re:"`` regex) -> role. Both may be given in a recipe under
    ``model:`` or in Python as ``compress.ModelSpec(...)`` passed to ``run_recipe(spec=...)``.
    """

    blocks: list[str] | None = Field(None, description="block containers, blocks or re: regexes")
    roles: dict[str, str] = Field(default_factory=dict, description="layer selector -> role")

    @field_validator("roles")
    @classmethod
    def _roles(cls, v: dict[str, str]) -> dict[str, str]:
        for sel, role in v.items():
            if role not in _ROLES:
                raise ValueError(f"roles[{sel!r}]: {role!r} is not a role ({', '.join(_ROLES)})")
            if sel in _ROLES:
                raise ValueError(f"roles: the key {sel!r} is a role; name a layer or a 're:' regex")
            check_selectors([sel], "roles")
        return v

    @field_validator("blocks")
    @classmethod
    def _blocks(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and not v:
            raise ValueError("blocks: give at least one name, or leave it out to find them")
        return v if v is None else check_selectors(v, "blocks")
