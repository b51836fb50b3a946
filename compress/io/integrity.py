"""What an output holds, recorded when written and checked when read.

The manifest's ``files`` lists every file the tool wrote beside it (path relative to the
output folder, size, SHA-256). Loading checks that each file the load reads exists with its
recorded size (cheap) and, with ``verify=True`` or ``dit-compress verify``, its hash. Every
path read from an output must stay inside the output folder.
"""

from __future__ import annotations

import hashlib
from pathlib import Path, PurePosixPath

from compress.errors import UserError

# written for people, not read by a load: checked by `dit-compress verify` only
_FOR_PEOPLE = ("report.json", "report.md", "report.html", "recipe.yaml")


def output_root(tdir: Path) -> Path:
    """The output folder of a manifest's folder (a pipeline keeps it in ``transformer/``)."""
    if tdir.name == "transformer" and (tdir.parent / "model_index.json").is_file():
        return tdir.parent
    return tdir


def inside(root: Path, rel: str, what: str) -> Path:
    """``root / rel`` when it stays inside ``root`` (no absolute path, no '..', no symlink out)."""
    pure = PurePosixPath(str(rel).replace("\\", "/"))
    if not str(rel) or pure.is_absolute() or ".." in pure.parts:
        raise UserError(f"{root}: {what} names {rel!r}, outside the output folder; the output "
                        "is damaged or was edited: re-run the recipe")
    p = root.joinpath(*pure.parts)
    try:
        p.resolve().relative_to(root.resolve())
    except ValueError:
        raise UserError(f"{root}: {what} {rel!r} leads outside the output folder (a symlink); "
                        "the output is damaged or was edited") from None
    return p


def sha256(p: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def record(root: Path, skip: set[Path]) -> dict[str, dict]:
    """{relative path: {size, sha256}} of every file under ``root`` but ``skip``."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p not in skip:
            out[p.relative_to(root).as_posix()] = {"size": p.stat().st_size, "sha256": sha256(p)}
    return out


def check(tdir: Path, manifest: dict, hashes: bool = False, everything: bool = False) -> int:
    """Check the files the manifest lists (sizes; hashes too when ``hashes``); the files for
    people (report, recipe) only when ``everything``. Returns the bytes checked."""
    root = output_root(tdir)
    table = manifest.get("files")
    if not isinstance(table, dict) or not table:
        raise UserError(f"{tdir}: the manifest lists no files (edited, or not written by this "
                        "dit-compress); re-run the recipe")
    n = 0
    for rel, want in table.items():
        if not everything and PurePosixPath(rel).name in _FOR_PEOPLE and "/" not in rel:
            continue
        p = inside(root, rel, "the manifest")
        if not isinstance(want, dict) or not isinstance(want.get("size"), int):
            raise UserError(f"{tdir}: the manifest's entry for {rel} is damaged; re-run the recipe")
        if not p.is_file():
            raise UserError(f"{p}: missing; the output is incomplete: re-run the recipe")
        size = p.stat().st_size
        if size != want["size"]:
            raise UserError(f"{p}: {size} bytes, the manifest says {want['size']}: the file was "
                            "changed or truncated; re-run the recipe")
        if hashes and sha256(p) != want.get("sha256"):
            raise UserError(f"{p}: its SHA-256 differs from the manifest's: the file was changed "
                            "or damaged; re-run the recipe")
        n += size
    return n
