"""Model-family adapters: which adapter handles a transformer, and loading models by path."""

from __future__ import annotations

from torch import nn

from compress.errors import UserError
from compress.models import dit, flux, generic, pixart, sana, sd3
from compress.models.base import ROLES, FamilyAdapter, ModelHandle
from compress.models.load import load_model

ADAPTERS: dict[str, FamilyAdapter] = {
    a.name: a
    for a in (
        dit.ADAPTER,
        pixart.ADAPTER,
        sd3.ADAPTER,
        flux.ADAPTER,
        sana.ADAPTER,
        generic.ADAPTER,
    )
}


def adapter_for_class(class_name: str) -> FamilyAdapter | None:
    """The family adapter for a diffusers transformer class name, or None."""
    for adapter in ADAPTERS.values():
        if class_name in adapter.transformer_classes:
            return adapter
    return None


def adapter_for(transformer: nn.Module, allow_generic: bool = False) -> FamilyAdapter:
    """The family adapter for ``transformer``, chosen by its class (or a base class) name.

    Args:
        transformer: the transformer module.
        allow_generic: fall back to the generic adapter instead of raising.

    Raises:
        UserError: the class is not supported and ``allow_generic`` is False.
    """
    for cls in type(transformer).__mro__:
        adapter = adapter_for_class(cls.__name__)
        if adapter is not None:
            return adapter
    if allow_generic:
        return generic.ADAPTER
    supported = ", ".join(c for a in ADAPTERS.values() for c in a.transformer_classes)
    raise UserError(
        f"transformer class {type(transformer).__name__} is not supported (supported: "
        f"{supported}); pass it as a plain nn.Module to use the generic adapter"
    )


__all__ = [
    "ADAPTERS",
    "ROLES",
    "FamilyAdapter",
    "ModelHandle",
    "adapter_for",
    "adapter_for_class",
    "load_model",
]
