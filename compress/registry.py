"""The pass registry: a plain dict from pass name to its definition, filled by explicit imports."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel


@dataclass
class PassResult:
    """What a pass returns.

    meta: JSON-able data that, with the config, rebuilds the changed structure on an empty model.
    report: JSON-able pass-specific figures for report.json (``passes[i]``).
    """

    meta: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PassDef:
    """A registered pass.

    apply(handle, calib, cfg) -> PassResult changes handle.transformer in place (it may train).
    restore(transformer, cfg, meta) rebuilds the structure on an empty (meta-device) model.
    kind: "structural" (changes shapes or block counts: pruning, MoE), "weights" (changes values
        only: distillation) or "format" (changes storage: PTQ, VQ). The recipe validator refuses
        a structural pass after a format pass.
    needs_calibration: whether apply reads the CalibrationSet (otherwise it may be None).
    check(handle, cfg) -> None: optional; raises UserError on what the config asks of this
        model that it cannot give (a selector naming no layer); run before any calibration.
    needs_teacher: whether apply reads ``handle.teacher`` (a frozen copy of the original
        transformer, made by the runner before the first pass).
    data(cfg) -> dict | None: optional; calibration settings (prompts, num_prompts,
        seeds_per_prompt, seed) of the pass's own data set, captured from the ORIGINAL pipeline
        before any pass runs and given to apply as ``calib`` instead of the recipe's set.
    """

    name: str
    config: type[BaseModel]
    apply: Callable[..., PassResult]
    restore: Callable[..., None]
    kind: str
    needs_calibration: bool = True
    check: Callable[..., None] | None = None
    needs_teacher: bool = False
    data: Callable[..., dict | None] | None = None


PASSES: dict[str, PassDef] = {}


def register_pass(defn: PassDef) -> PassDef:
    if defn.name in PASSES:
        raise ValueError(f"pass {defn.name!r} registered twice")
    PASSES[defn.name] = defn
    return defn


def get_pass(name: str) -> PassDef:
    _load_builtin()
    return PASSES[name]


def all_passes() -> dict[str, PassDef]:
    _load_builtin()
    return PASSES


def _load_builtin() -> None:
    # explicit imports, no package walking: each module registers itself on import
    from compress.passes import (  # noqa: F401
        distill,
        prune_depth,
        prune_width,
        ptq,
        route_blocks,
        to_moe,
        vq,
    )
