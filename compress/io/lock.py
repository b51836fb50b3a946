"""One run per output folder: a lock beside ``--out`` taken before any work, released by the OS
when the process ends however it ends; leftovers of killed runs are removed when it is taken."""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

from compress.errors import UserError


def leftovers(out: Path) -> list[Path]:
    """Temporary folders of earlier runs to ``out`` (``.NAME.tmp-*``, ``.NAME.old-*``)."""
    out = Path(out)
    if not out.parent.is_dir():
        return []
    return sorted(p for p in out.parent.iterdir()
                  if p.name.startswith((f".{out.name}.tmp-", f".{out.name}.old-")))


class OutLock:
    """``with OutLock(out):`` holds ``.NAME.lock``; a second holder is refused with its PID."""

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        self.path = self.out.parent / f".{self.out.name}.lock"
        self.fd: int | None = None

    def __enter__(self) -> OutLock:  # noqa: PYI034
        self.out.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise UserError(f"--out {self.out}: another run (PID {other}) is writing it; wait "
                            "for it or choose another folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self.fd = fd
        for p in leftovers(self.out):  # we hold the lock: nobody else is writing these
            shutil.rmtree(p, ignore_errors=True)
        return self

    def __exit__(self, *exc) -> None:
        # the file stays (unlinking it would let a waiting opener and a new creator both lock)
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def held(out: Path) -> bool:
    """Whether a live run holds ``out``'s lock."""
    path = Path(out).parent / f".{Path(out).name}.lock"
    if not path.is_file():
        return False
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def stale(outs: list[Path], cache_root: Path | None, min_age_s: float) -> list[Path]:
    """What killed runs left: temp folders beside the outputs not being written now, their
    lock files, and calibration-cache temp folders older than ``min_age_s``."""
    import time

    found: list[Path] = []
    for out in outs:
        if held(out):
            continue
        found += leftovers(out)
        lock = Path(out).parent / f".{Path(out).name}.lock"
        if lock.is_file():
            found.append(lock)
    if cache_root is not None and cache_root.is_dir():
        now = time.time()
        for p in cache_root.rglob(".tmp-*"):
            if p.is_dir() and now - p.stat().st_mtime >= min_age_s:
                found.append(p)
    return found
