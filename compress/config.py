"""The base of every configuration model (recipe sections, pass configs, model specs).

Read strictly: unknown keys are errors, numbers must be finite, and values are not coerced
across types (``bits: 8.0``, ``num_prompts: true`` or ``steps: "20"`` are refused rather than
silently turned into integers). Bounds live on each field.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict

# generous ceilings: far above any real use, low enough that a typo (1e9 steps) is refused
MAX_STEPS = 1000
MAX_COUNT = 100_000  # prompts, samples, repeats
MAX_TRAIN_STEPS = 10_000_000  # optimiser steps of a training pass (distillation runs long)
MAX_SEED = 2**32 - 1  # numpy / torch generators take 32- or 64-bit seeds; keep the portable range


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


def compile_selector(sel: str, what: str) -> None:
    """A ``re:`` selector's regex must compile (ValueError naming ``what``)."""
    if sel.startswith("re:"):
        try:
            re.compile(sel[3:])
        except re.error as exc:
            raise ValueError(f"{what}: bad regex {sel!r}: {exc}") from None


def check_selectors(v: list[str], what: str) -> list[str]:
    """Selectors are non-empty strings; ``re:`` ones must compile."""
    for sel in v:
        if not sel.strip():
            raise ValueError(f"{what}: an empty selector")
        compile_selector(sel, what)
    return v


def unique(v: list, what: str) -> list:
    if len(set(v)) != len(v):
        raise ValueError(f"{what}: duplicates in {v}")
    return v
