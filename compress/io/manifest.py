"""compress_manifest.json: what was done to the transformer, enough to rebuild it without data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from compress.errors import UserError

FORMAT_VERSION = 1
MANIFEST = "compress_manifest.json"


def build_manifest(handle, recipe_resolved: dict, recipe_hash: str, passes: list[dict],
                   prepared: list[dict] | None = None) -> dict:
    from compress import __version__

    cls = type(handle.transformer)
    return {
        "transformer_module": cls.__module__,
        "prepared": prepared or [],
        "format_version": FORMAT_VERSION,
        "tool": f"dit-compress {__version__}",
        "transformer_class": type(handle.transformer).__name__,
        "family": handle.family,
        "source": {"path": str(handle.source) if handle.source else None,
                   "hash": handle.source_hash},
        "recipe": recipe_resolved,
        "recipe_hash": recipe_hash,
        "passes": passes,
    }


def read_manifest(tdir: Path) -> dict[str, Any]:
    p = tdir / MANIFEST
    if not p.is_file():
        raise UserError(
            f"{tdir}: no {MANIFEST}; this is not a dit-compress output (load it with diffusers)"
        )
    try:
        m = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{p}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if m.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"{p}: format_version {m.get('format_version')} is not {FORMAT_VERSION}; "
            "upgrade dit-compress"
        )
    return m
