"""compress_manifest.json: what was done to the transformer, enough to rebuild it without data.

The manifest is sealed: ``manifest_sha256`` is the SHA-256 of its own canonical JSON without
that key, so an edited manifest (a layer's bits changed by hand, an entry of ``files`` removed)
is refused on read instead of rebuilding the wrong layers. Its shape is checked by a schema
(``ManifestModel``) so that a damaged one is one line, never a KeyError in a later step.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from compress.errors import UserError

FORMAT_VERSION = 2
MANIFEST = "compress_manifest.json"
SEAL = "manifest_sha256"
MAX_MANIFEST_BYTES = 64 * 1024**2


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class PassEntry(_Strict):
    name: str
    config: dict[str, Any]
    meta: dict[str, Any]


class FileEntry(_Strict):
    size: int = Field(ge=0)
    sha256: str
    head: list[int | str] = Field(min_length=2, max_length=2)  # [bytes, SHA-256 of them]

    @model_validator(mode="after")
    def _head(self) -> FileEntry:
        n, digest = self.head
        if not (isinstance(n, int) and isinstance(digest, str) and 0 <= n <= self.size):
            raise ValueError("head must be [bytes, SHA-256] with bytes within the file's size")
        return self


class SourceEntry(_Strict):
    path: str | None
    hash: str | None


class ManifestModel(_Strict):
    format_version: int
    tool: str
    transformer_class: str
    transformer_module: str
    family: str
    prepared: list[dict[str, Any]]
    source: SourceEntry
    recipe: dict[str, Any]
    recipe_hash: str
    passes: list[PassEntry]
    files: dict[str, FileEntry]
    manifest_sha256: str


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


def _digest(m: dict) -> str:
    body = {k: v for k, v in m.items() if k != SEAL}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def seal(m: dict) -> dict:
    """``m`` with its seal added (the last step before writing it)."""
    return {**m, SEAL: _digest(m)}


def write_manifest(tdir: Path, m: dict) -> None:
    (tdir / MANIFEST).write_text(json.dumps(seal(m), indent=2, sort_keys=True, allow_nan=False))


def read_manifest(tdir: Path) -> dict[str, Any]:
    """The manifest of an output, checked: valid JSON, this format version, sealed, schema."""
    p = Path(tdir) / MANIFEST
    if not p.is_file():
        raise UserError(
            f"{tdir}: no {MANIFEST}; this is not a dit-compress output (load it with diffusers)"
        )
    redo = "the output is damaged or was edited: re-run the recipe"
    if p.is_symlink():
        raise UserError(f"{p}: a symlink (to {os.readlink(p)}); dit-compress writes none: {redo}")
    if p.stat().st_size > MAX_MANIFEST_BYTES:
        raise UserError(f"{p}: {p.stat().st_size} bytes, far larger than a manifest; {redo}")
    try:
        m = json.loads(p.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{p}: not UTF-8 text; {redo}") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{p}: not valid JSON ({exc.msg} at line {exc.lineno}); {redo}") from None
    except RecursionError:
        raise UserError(f"{p}: nested too deeply to be a manifest; {redo}") from None
    if not isinstance(m, dict):
        raise UserError(f"{p}: not a JSON object; {redo}")
    version = m.get("format_version")
    if version != FORMAT_VERSION:
        if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
            raise UserError(f"{p}: format_version {version} is newer than this dit-compress "
                            f"reads ({FORMAT_VERSION}); upgrade dit-compress")
        raise UserError(f"{p}: format_version {version!r} is not {FORMAT_VERSION} (an older "
                        "dit-compress, or damaged); re-run the recipe with this version")
    try:
        if m.get(SEAL) != _digest(m):
            raise UserError(f"{p}: its {SEAL} does not match its content; {redo}")
    except (ValueError, TypeError):  # NaN/inf or a non-string key cannot be canonical JSON
        raise UserError(f"{p}: holds values no manifest has; {redo}") from None
    try:
        ManifestModel.model_validate(m)
    except ValidationError as exc:
        e = exc.errors()[0]
        where = ".".join(str(x) for x in e["loc"]) or "(top)"
        raise UserError(f"{p}: {where}: {e['msg']}; {redo}") from None
    return m
