"""Crash-safe file writing shared by checkpoints, results, caches and converted models.

Every artifact is written to a temporary sibling, flushed to disk and renamed into place, so an
interrupted write never leaves a file that looks complete. Every byte goes through :func:`_write_all`,
and a write that fails (full disk, read-only folder) removes its temporary file and raises
:class:`WriteError`, which names the file, the reason and what to do; the earlier version of the file,
if there was one, is untouched.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


class WriteError(OSError):
    """An output file or folder could not be written; ``errno`` is the operating system's code."""


_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_DENIED = {errno.EACCES, errno.EPERM, errno.EROFS}


def write_error(path: str | os.PathLike[str], err: OSError, folder: bool = False) -> WriteError:
    """A :class:`WriteError` for ``err`` raised while writing ``path`` (a file, or a folder with ``folder``)."""
    path = Path(path)
    where = path if folder else path.parent
    reason = err.strerror or str(err)
    if err.errno in _FULL:
        hint = f"the file system holding {where} is full: free some space there, or write elsewhere, and run again"
    elif err.errno in _DENIED:
        hint = f"{where} is not writable: make it writable or choose another output folder"
    else:
        hint = ""
    kept = "" if folder else f"; any earlier {path.name} is unchanged"
    return WriteError(err.errno, f"cannot write {path}: {reason}" + (f"; {hint}" if hint else "") + kept)


@contextlib.contextmanager
def writing(path: str | os.PathLike[str], folder: bool = False) -> Iterator[None]:
    """Turn an :class:`OSError` raised inside the block into a :class:`WriteError` naming ``path``."""
    try:
        yield
    except WriteError:
        raise
    except OSError as e:
        raise write_error(path, e, folder) from e


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def shared_mode(path: str | os.PathLike[str]) -> None:
    """Give a file or folder made by :mod:`tempfile` (private, 0600/0700) the usual umask-based mode."""
    base = 0o777 if os.path.isdir(path) else 0o666
    os.chmod(path, base & ~_umask())


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush a directory entry (the rename of a file into it) to disk, where the platform allows."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike[str]) -> None:
    """Flush every file below ``root`` and the directories themselves to disk."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


def _write_all(fh: BinaryIO, data: bytes) -> None:
    """The one place where artifact bytes are handed to the file system (tests inject disk faults here)."""
    fh.write(data)


def discard(path: str | os.PathLike[str]) -> None:
    """Remove a temporary file if it is there; never raises (it runs while another error propagates)."""
    with contextlib.suppress(OSError):
        os.unlink(path)


def ensure_dir(path: str | os.PathLike[str]) -> Path:
    """Create folder ``path`` (and parents) if needed; a failure names the folder."""
    path = Path(path)
    with writing(path, folder=True):
        path.mkdir(parents=True, exist_ok=True)
    return path


def ensure_writable_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` if needed and check that a file can be created in it, before any work is done."""
    path = ensure_dir(path)
    with writing(path, folder=True):
        fd, probe = tempfile.mkstemp(dir=path, prefix=".mobiquant-write-check.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    return path


def stage_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to a new temporary sibling of ``path``, flushed to disk; returns the temporary path.

    The caller renames it into place (``os.replace``) or removes it with :func:`discard`. On failure
    nothing is left behind and a :class:`WriteError` naming ``path`` is raised.
    """
    path = Path(path)
    ensure_dir(path.parent)
    with writing(path):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                _write_all(fh, data)
                fh.flush()
                os.fsync(fh.fileno())
            shared_mode(tmp)
        except BaseException:
            discard(tmp)
            raise
    return Path(tmp)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` through a flushed temporary sibling and an atomic rename."""
    path = Path(path)
    tmp = stage_bytes(path, data)
    with writing(path):
        try:
            os.replace(tmp, path)
        except BaseException:
            discard(tmp)
            raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
