"""Atomic, durable file writes: the one implementation every writer in the project uses.

A write goes to a fresh hidden temporary file beside the target (``.NAME.XXXXXXXX.tmp``, created with the
ordinary ``0o666 & ~umask`` permissions), is flushed and fsynced, replaces the target with ``os.replace`` and the
folder is fsynced, so after a crash (kill -9, power loss) the target holds the old content or the new one, never
a mix. On an error the temporary file is removed and the target is untouched.

* :func:`atomic_file` yields the temporary *path* (for writers that open it themselves: llama.cpp, gguf);
* :func:`atomic_open` yields an open file object (``np.savez(f, ...)``, ``json.dump(..., f)``);
* :func:`atomic_write_bytes` writes bytes.

:func:`scratch_file` is a temporary file that never becomes an output; :func:`atomic_dir` replaces a folder.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


def _fresh_tmp(dst: Path) -> Path:
    """Create (exclusively) an empty hidden file beside ``dst``; the umask sets its permissions, as for open()."""
    for _ in range(100):
        tmp = dst.with_name(f".{dst.name}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"no free temporary name beside {dst}")


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable; a filesystem that cannot fsync a folder is not an error."""
    try:
        _fsync_path(folder)
    except OSError:
        pass


@contextmanager
def atomic_file(dst: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``dst`` (an empty file); on success its content is fsynced and replaces
    ``dst`` (the folder fsynced too), on error it is removed. Missing parent folders are made."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = _fresh_tmp(dst)
    try:
        yield tmp
        _fsync_path(tmp)
        os.replace(tmp, dst)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
    fsync_dir(dst.parent)


@contextmanager
def atomic_open(dst: str | os.PathLike, mode: str = "wb", **kwargs: Any) -> Iterator[IO[Any]]:
    """Yield a file open for writing (``mode`` "wb" or "w"; ``kwargs`` go to open(), e.g. encoding) that
    atomically and durably becomes ``dst`` when the block ends without an error (see :func:`atomic_file`)."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open writes a whole new file: mode 'wb' or 'w', got {mode!r}")
    with atomic_file(dst) as tmp, open(tmp, mode, **kwargs) as f:
        yield f  # closed before atomic_file fsyncs and renames it


def atomic_write_bytes(dst: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``dst`` atomically and durably; returns ``dst`` as a Path."""
    with atomic_open(dst) as f:
        f.write(data)
    return Path(dst)


@contextmanager
def scratch_file(folder: Path, stem: str) -> Iterator[Path]:
    """Yield a fresh temporary file path in ``folder``; it is removed afterwards whatever happens."""
    fd, tmp = tempfile.mkstemp(prefix=f".{stem}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        yield Path(tmp)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_dir(dst: Path) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``dst``; on success it becomes ``dst`` (replacing an old one)."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent))
    try:
        yield tmp
        if dst.exists():
            old = dst.with_name(f".{dst.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dst, old)
            os.replace(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
