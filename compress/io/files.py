"""Copying into an output: independent files (a reflink where the file system offers one, else
a byte copy; never a hard link, so editing the output cannot change the input or the package),
folders followed through symlinks but never round a loop."""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

from compress.errors import UserError

_FICLONE = 0x40049409  # Linux ioctl: share extents copy-on-write (btrfs, xfs, ...)


def copy_file(src: Path, dst: Path) -> None:
    """``dst`` becomes an independent copy of ``src`` (contents and permission bits)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        try:
            fcntl.ioctl(fo.fileno(), _FICLONE, fi.fileno())
        except OSError:
            shutil.copyfileobj(fi, fo, 1 << 20)
    shutil.copymode(src, dst)


def walk(src: Path, rel: Path = Path(), _seen: frozenset[Path] = frozenset()):
    """(file, path relative to ``src``) of every file under ``src``, symlinks followed; a
    symlink leading back into a folder on the way, a broken link or a special file is refused."""
    real = src.resolve()
    if src.is_dir():
        if real in _seen:
            raise UserError(f"{src}: a symlink loop (it leads back to {real}); remove the link")
        for child in sorted(src.iterdir()):
            yield from walk(child, rel / child.name, _seen | {real})
    elif src.is_file():
        yield src, rel
    elif src.is_symlink():
        raise UserError(f"{src}: a broken symlink (to {os.readlink(src)}); fix or remove it")
    else:
        raise UserError(f"{src}: neither a file nor a folder; remove it from the model folder")


def copy_tree(src: Path, dst: Path) -> None:
    """Copy a file or folder (see ``walk``); every file becomes an independent copy."""
    if src.is_dir():
        dst.mkdir(parents=True, exist_ok=True)
    for f, rel in list(walk(src)):  # the whole tree is checked before the first byte is copied
        copy_file(f, dst / rel if rel.parts else dst)
