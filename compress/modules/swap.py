"""Replace a submodule by qualified name."""

from __future__ import annotations

from torch import nn


def get_submodule(root: nn.Module, name: str) -> nn.Module:
    return root.get_submodule(name)


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)
