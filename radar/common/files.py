"""Writes that are all or nothing: a reader (or a rerun after a crash) sees the old file or the new one, never half."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write `data` to `path` through a hidden temporary sibling and a rename."""
    write = (lambda tmp: tmp.write_bytes(data)) if isinstance(data, bytes) else (lambda tmp: tmp.write_text(data))
    return write_atomic_with(path, write)


def write_atomic_with(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Let `write(tmp)` fill a hidden temporary sibling of `path` (a library's own writer), then rename it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # hidden: never mistaken for data
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def replace_dir(src: str | Path, dest: str | Path) -> None:
    """Move the finished directory `src` to `dest`, replacing what was there: the old one is moved aside first, so
    `dest` is at every moment either the old whole directory or the new one."""
    src, dest = Path(src), Path(dest)
    if dest.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}-old-", dir=dest.parent))
        os.replace(dest, old / "x")
        shutil.rmtree(old, ignore_errors=True)
    os.replace(src, dest)


@contextmanager
def new_dir(dest: str | Path) -> Iterator[Path]:
    """A temporary sibling of `dest` to write into; it becomes `dest` when the block finishes without error."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-new-", dir=dest.parent))
    mask = os.umask(0)
    os.umask(mask)
    tmp.chmod(0o777 & ~mask)  # mkdtemp makes it private (0700); the finished directory gets the usual mode
    try:
        yield tmp
        replace_dir(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def new_files_in(dest: str | Path) -> Iterator[Path]:
    """A temporary directory to write files into; when the block finishes without error each file is moved into
    `dest` (created if needed) by a rename, leaving whatever else `dest` holds alone."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".new-", dir=dest))
    try:
        yield tmp
        for f in sorted(tmp.iterdir()):
            os.replace(f, dest / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
