"""What an output holds, recorded when written and checked when read.

The manifest's ``files`` lists every file the tool wrote beside it (path relative to the
output folder, size, SHA-256, and the SHA-256 of its head). The head is the part a load reads
to decide what it loads: a safetensors file's header (names, dtypes, shapes, offsets), the
whole of any file up to 1 MiB (configs, JSON, tokenizer files). Every load checks each file's
size and head (cheap: a few MB read); ``verify=True`` or ``dit-compress verify`` hash whole
files (0.67 s per GB here, more than 10% of a load: see README, Integrity). Every path read
from an output must stay inside the output folder.
"""

from __future__ import annotations

import hashlib
import os
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


def check_links(root: Path) -> None:
    """The tool writes no symlinks: one leaving the output, or any directory symlink (a loop,
    or a second path to the same files), means the output was edited; refuse it."""
    real = root.resolve()
    for dirpath, dirnames, filenames in os.walk(root):  # does not follow directory links
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if not p.is_symlink():
                continue
            rel = p.relative_to(root).as_posix()
            if p.is_dir():
                raise UserError(f"{root}: {rel} is a symlink to a folder ({os.readlink(p)}); "
                                "dit-compress writes none: the output was edited, re-run the "
                                "recipe or remove the link")
            try:
                p.resolve().relative_to(real)
            except (ValueError, OSError):
                raise UserError(f"{root}: {rel} is a symlink leading outside the output folder "
                                "(or a loop); the output was edited: re-run the recipe") from None


SMALL = 1 << 20  # files up to this size are hashed whole on every load
MAX_HEADER = 100 * 1024**2  # safetensors caps its JSON header at 100 MB


def sha256(p: Path, chunk: int = 1 << 22, limit: int | None = None) -> str:
    """SHA-256 of the file, or of its first ``limit`` bytes."""
    h = hashlib.sha256()
    left = limit
    with open(p, "rb") as f:
        while left is None or left > 0:
            block = f.read(chunk if left is None else min(chunk, left))
            if not block:
                break
            h.update(block)
            if left is not None:
                left -= len(block)
    return h.hexdigest()


def head_bytes(p: Path) -> int:
    """How much of ``p`` every load hashes: a safetensors header (8-byte length + JSON), or
    the first 1 MiB (the whole file when smaller)."""
    size = p.stat().st_size
    if p.suffix == ".safetensors" and size >= 8:
        with open(p, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
        if n <= min(MAX_HEADER, size - 8):
            return max(8 + n, min(size, SMALL))
    return min(size, SMALL)


def record(root: Path, skip: set[Path]) -> dict[str, dict]:
    """{relative path: {size, sha256}} of every file under ``root`` but ``skip``."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p not in skip:
            n = head_bytes(p)
            out[p.relative_to(root).as_posix()] = {
                "size": p.stat().st_size, "sha256": sha256(p), "head": [n, sha256(p, limit=n)]}
    return out


def check(tdir: Path, manifest: dict, hashes: bool = False, everything: bool = False) -> int:
    """Check the files a manifest from ``read_manifest`` lists (sizes and heads; whole-file hashes too when
    ``hashes``); the files for people (report, recipe) only when ``everything``. Returns the
    bytes checked."""
    root = output_root(tdir)
    table = manifest["files"]  # entries shaped by read_manifest's schema (manifest.FileEntry)
    if not table:
        raise UserError(f"{tdir}: the manifest lists no files (edited, or not written by this "
                        "dit-compress); re-run the recipe")
    check_links(root)
    n = 0
    for rel, want in table.items():
        if not everything and PurePosixPath(rel).name in _FOR_PEOPLE and "/" not in rel:
            continue
        p = inside(root, rel, "the manifest")
        head = want["head"]
        if not p.is_file():
            raise UserError(f"{p}: missing; the output is incomplete: re-run the recipe")
        size = p.stat().st_size
        if size != want["size"]:
            raise UserError(f"{p}: {size} bytes, the manifest says {want['size']}: the file was "
                            "changed or truncated; re-run the recipe")
        if sha256(p, limit=head[0]) != head[1]:
            raise UserError(f"{p}: its header (first {head[0]} bytes) differs from the one "
                            "written: the file was changed or damaged; re-run the recipe")
        if hashes and sha256(p) != want["sha256"]:
            raise UserError(f"{p}: its SHA-256 differs from the manifest's: the file was changed "
                            "or damaged; re-run the recipe")
        n += size
    return n
